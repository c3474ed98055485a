"""Pictures of the senses: where a word's occurrences fall among its sense centres, and the projector.

    occ = word_occurrences(encoder, texts, ["bank", "bat"])   # vectors, sense ids, contexts per word
    plot_senses(occ, RUN / "eval" / "senses.png")              # one 2-D PCA panel per word
    export_projector(encoder.dictionary, encoder.tokenizer, RUN / "tb" / "senses")

plot_senses needs matplotlib and quietly draws nothing without it (as report.py does);
export_projector writes TensorBoard's embedding projector files (`tensorboard --logdir RUN/tb`,
PROJECTOR tab), one point per sense centre, labelled with its token, count and an example.
"""
from __future__ import annotations

import io
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from dist_sense.formats.manifest import atomic_write_bytes

MIN_OCCURRENCES = 5
"""A word with fewer occurrences in the texts is left out: a handful of points shows no structure."""
CONTEXT_CHARS = 100
EXAMPLE_CHARS = 120
PROJECTOR_TAG = "senses"
PROJECTOR_HEADER = ["token", "token_id", "sense", "count", "example"]


def _context(text: str, start: int, end: int, width: int = CONTEXT_CHARS) -> str:
    """About `width` characters of `text` around start:end, the word marked [[like this]] as in
    the dictionary's own examples, on one line."""
    side = max((width - (end - start)) // 2, 10)
    left, right = max(start - side, 0), min(end + side, len(text))
    snippet = f"{text[left:start]}[[{text[start:end]}]]{text[end:right]}"
    snippet = ("..." if left > 0 else "") + snippet + ("..." if right < len(text) else "")
    return " ".join(snippet.split())


def _first_token(offsets, start: int, end: int) -> int | None:
    """Position of the first token overlapping the character span start:end (as disambiguate
    picks it); None when truncation cut the word off."""
    for position, (a, b) in enumerate(offsets):
        if b > a and a < end and b > start:
            return position
    return None


def word_occurrences(encoder, texts, words, max_per_word: int = 200, batch_size: int = 32) -> dict[str, dict]:
    """Per word of `words` (in their order), its occurrences in `texts` as the encoder sees them.

    A text counts for a word when the word occurs in it as a whole word (case-insensitive);
    only its first occurrence there is taken, and at most `max_per_word` texts per word.
    Each occurrence contributes the continuous state of the word's first token. A word's
    occurrences can tokenize differently (a capitalised or sentence-initial form is another
    token, with its own senses), so only those of its most common first token are kept.

    Returns word -> {"word", "token" (string form), "token_id", "vectors" float32 [n, d],
    "sense_ids" int64 [n] (encode's snapped senses), "contexts" (n strings, ~100 characters,
    the word marked [[like this]]), "centres" float32 [k, d], "counts" int64 [k],
    "examples" (the dictionary's example contexts, per sense)}. A word is left out when its
    token has no dictionary entry or fewer than 2 senses, or when it has fewer than
    MIN_OCCURRENCES occurrences.
    """
    if max_per_word < 1:
        raise ValueError(f"max_per_word={max_per_word}: must be at least 1")
    texts = list(texts)  # indexed twice below; a generator would be spent after one pass
    hits = _word_hits(encoder, texts, _texts_per_word(texts, words, max_per_word), words, batch_size)
    dictionary, result = encoder.dictionary, {}
    for word in dict.fromkeys(words):
        if not hits[word]:
            continue
        token_id = Counter(hit[0] for hit in hits[word]).most_common(1)[0][0]
        kept = [hit for hit in hits[word] if hit[0] == token_id]
        if token_id not in dictionary or len(kept) < MIN_OCCURRENCES:
            continue
        centres = dictionary.senses(token_id)
        if len(centres) < 2:
            continue
        result[word] = {
            "word": word, "token": encoder.tokenizer.convert_ids_to_tokens(token_id), "token_id": token_id,
            "vectors": np.stack([hit[1] for hit in kept]).astype(np.float32),
            "sense_ids": np.array([hit[2] for hit in kept], dtype=np.int64),
            "contexts": [hit[3] for hit in kept],
            "centres": centres, "counts": dictionary.sense_counts(token_id),
            "examples": dictionary.examples(token_id),
        }
    return result


def _texts_per_word(texts: list, words, max_per_word: int) -> dict[int, list[tuple[str, int, int]]]:
    """text number -> [(word, start, end)] of its first whole-word match per word, at most
    `max_per_word` texts a word; a text shared by several words is then encoded once."""
    wanted: dict[int, list[tuple[str, int, int]]] = {}
    for word in dict.fromkeys(words):
        pattern, found = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE), 0
        for number, text in enumerate(texts):
            match = pattern.search(text)
            if match:
                wanted.setdefault(number, []).append((word, match.start(), match.end()))
                found += 1
                if found == max_per_word:
                    break
    return wanted


def _word_hits(encoder, texts: list, wanted: dict, words, batch_size: int) -> dict[str, list[tuple]]:
    """word -> [(token id, vector, sense id, context)] of its first token in each wanted text, in text order."""
    hits: dict[str, list[tuple]] = {word: [] for word in words}
    order = sorted(wanted)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for number, encoded in zip(chunk, encoder.encode([texts[n] for n in chunk], batch_size=batch_size)):
            for word, a, b in wanted[number]:
                position = _first_token(encoded.offsets, a, b)
                if position is not None:
                    hits[word].append((int(encoded.token_ids[position]), np.asarray(encoded.hidden[position]),
                                       int(encoded.sense_ids[position]), _context(texts[number], a, b)))
    return hits


def _pca_2d(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(projection [n, 2], share of the variance on each axis [2]) by SVD of the centred points;
    an axis the points do not have (d = 1) is zeros."""
    centred = points - points.mean(axis=0, keepdims=True)
    _, singular, axes = np.linalg.svd(centred, full_matrices=False)
    projected = np.zeros((len(points), 2), dtype=np.float64)
    used = min(2, axes.shape[0])
    projected[:, :used] = centred @ axes[:used].T
    variance = singular**2
    share = np.zeros(2)
    share[:used] = variance[:used] / max(variance.sum(), 1e-30)
    return projected, share


def _one_line(text: str, limit: int) -> str:
    """`text` with tabs and newlines made spaces (they would break a TSV row or a legend line),
    at most `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plain(text: str, limit: int) -> str:
    """_one_line for matplotlib: `$` escaped, which it would otherwise read as mathtext (and an
    unbalanced one in a context fails the whole figure)."""
    return _one_line(text, limit).replace("$", r"\$")


def _legend_lines(entry: dict, limit: int = 70) -> list[str]:
    """One line per sense present among the occurrences: id, occurrences here, an example."""
    here = Counter(int(s) for s in entry["sense_ids"] if s >= 0)
    examples, lines = entry.get("examples") or [], []
    for sense in sorted(here):
        stored = examples[sense] if sense < len(examples) else []
        example = stored[0] if stored else entry["contexts"][int(np.argmax(entry["sense_ids"] == sense))]
        lines.append(f"sense {sense}: {here[sense]} here | {_plain(example, limit)}")
    return lines


def plot_senses(occurrences: dict[str, dict], out_png, max_words: int = 4) -> Path | None:
    """Draw each word's occurrences (from word_occurrences) among its sense centres to `out_png`.

    One panel per word, at most `max_words`: a 2-D PCA fitted on the word's occurrence
    vectors and centres together, occurrences coloured by sense, centres as large X in the
    same colour, and under the panel each sense present with its count here and an example.
    The PNG is rendered in memory and renamed into place, so a crash never leaves half a
    file. Returns its path, or None (writing nothing) when matplotlib is missing or there is
    nothing to draw.
    """
    entries = list(occurrences.values())[:max_words]
    if not entries:
        return None
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    # A Figure of our own on the Agg canvas: no pyplot, so no global backend switch or state.
    legends = [_legend_lines(entry) for entry in entries]
    text_rows = max(len(lines) for lines in legends)
    fig = Figure(figsize=(5.2 * len(entries), 4.6 + 0.17 * text_rows), dpi=110)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, len(entries), height_ratios=[4.4, 0.2 + 0.17 * text_rows])
    for column, (entry, lines) in enumerate(zip(entries, legends)):
        vectors, centres = np.asarray(entry["vectors"], np.float64), np.asarray(entry["centres"], np.float64)
        projected, share = _pca_2d(np.concatenate([vectors, centres]))
        points, centre_points = projected[: len(vectors)], projected[len(vectors) :]
        k, senses = len(centres), np.asarray(entry["sense_ids"])
        cmap = matplotlib.colormaps["tab10" if k <= 10 else "tab20"]
        colour = [cmap(sense % cmap.N) for sense in range(k)]
        ax = fig.add_subplot(grid[0, column])
        for sense in range(k):
            mine = senses == sense
            if mine.any():
                ax.scatter(points[mine, 0], points[mine, 1], s=14, alpha=0.7, color=colour[sense],
                           label=f"sense {sense}")
            ax.scatter(centre_points[sense, 0], centre_points[sense, 1], marker="X", s=170, color=colour[sense],
                       edgecolors="black", linewidths=0.8, zorder=3)
        if (senses < 0).any():  # cannot happen for a token with senses; shown rather than dropped
            ax.scatter(points[senses < 0, 0], points[senses < 0, 1], s=14, color="grey", label="no sense")
        ax.set_title(_plain(f"{entry['word']}: {k} senses, {len(vectors)} occurrences", 80), fontsize=10)
        ax.set_xlabel(f"PC1 ({share[0]:.0%})", fontsize=8)
        ax.set_ylabel(f"PC2 ({share[1]:.0%})", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="best", markerscale=1.2)
        note = fig.add_subplot(grid[1, column])
        note.axis("off")
        note.text(0, 1, "\n".join(lines), va="top", ha="left", fontsize=6.5, family="monospace",
                  transform=note.transAxes)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    return atomic_write_bytes(out_png, png.getvalue())


def _projector_rows(dictionary, max_senses: int) -> list[int]:
    """The tokens to export: most vectors (sum of counts) first, ties by token id, each with all
    its senses, while the senses fit in `max_senses`."""
    tokens = [int(t) for t in dictionary.token_ids]
    totals = {t: int(dictionary.sense_counts(t).sum()) for t in tokens}
    chosen, used = [], 0
    for token in sorted(tokens, key=lambda t: (-totals[t], t)):
        k = len(dictionary.sense_counts(token))
        if used + k > max_senses:
            break  # stop rather than skip: the export is exactly the N most frequent tokens
        chosen.append(token)
        used += k
    return chosen


def export_projector(dictionary, tokenizer, log_dir, max_senses: int = 5000) -> Path:
    """Write the sense centres to TensorBoard's embedding projector under `log_dir`; returns log_dir.

    One point per sense, with metadata columns token, token_id, sense, count and example (the
    sense's first example context, on one line, at most ~120 characters; "-" when it has
    none). With more than `max_senses` senses, the tokens built from the most vectors come
    first, each with all its senses. A rerun replaces the previous export.
    """
    from torch.utils.tensorboard import SummaryWriter

    if max_senses < 1:
        raise ValueError(f"max_senses={max_senses}: must be at least 1")
    source = getattr(dictionary, "source", "dictionary")
    if len(dictionary) == 0:
        raise ValueError(f"{source}: the dictionary has no tokens to export")
    tokens = _projector_rows(dictionary, max_senses)
    if not tokens:
        raise ValueError(f"max_senses={max_senses}: fewer than the {dictionary.k_max} senses of the most "
                         f"frequent token in {source}; raise it")
    centres, rows = [], []
    for token in tokens:
        name = _one_line(tokenizer.convert_ids_to_tokens(token), 60) or "-"
        examples = dictionary.examples(token)
        for sense, (centre, count) in enumerate(zip(dictionary.senses(token), dictionary.sense_counts(token))):
            stored = examples[sense] if sense < len(examples) else []
            example = _one_line(stored[0], EXAMPLE_CHARS) if stored else ""
            centres.append(centre)
            rows.append([name, token, sense, int(count), example or "-"])
    log_dir = Path(log_dir)
    # add_embedding writes into log_dir/00000/<tag> and only warns when that exists: clear our
    # own previous export so no stale file outlives a rerun.
    shutil.rmtree(log_dir / "00000" / PROJECTOR_TAG, ignore_errors=True)
    writer = SummaryWriter(str(log_dir))
    try:
        writer.add_embedding(np.stack(centres).astype(np.float32), metadata=rows, metadata_header=PROJECTOR_HEADER,
                             tag=PROJECTOR_TAG)
    finally:
        writer.close()
    for path in (log_dir / "projector_config.pbtxt", log_dir / "00000" / PROJECTOR_TAG / "tensors.tsv",
                 log_dir / "00000" / PROJECTOR_TAG / "metadata.tsv"):
        if not path.is_file():
            raise RuntimeError(f"{path}: TensorBoard's add_embedding did not write it")
    return log_dir
