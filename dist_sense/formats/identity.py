"""Content fingerprints of a stage's inputs, and how two identities are compared.

A stage's result depends on files (the corpus, the teacher's weights, config and tokenizer
files) and on config values. Files are known by their bytes, not their names or sizes:
`file_digest` is sha256 over the file, streamed in 4 MiB blocks (about 1.7 GB/s on one
core here). So that a multi-GB teacher or corpus is not hashed at every start, digests are
cached in a JSON file (`DIST_SENSE_CACHE`, default ~/.cache/dist_sense/fingerprints.json)
keyed by the resolved path and its (size, mtime_ns, ctime_ns, inode): a file rewritten in
place changes its ctime even when its size and mtime are put back, so it is hashed again.
A cache that cannot be read or written is ignored (the file is hashed every time).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

BLOCK = 4 << 20
_LOCK = threading.Lock()
_MEMORY: dict[str, dict] = {}
MODEL_SUFFIXES = (".json", ".safetensors", ".bin", ".gguf", ".model", ".txt", ".py", ".tiktoken", ".pt", ".pth")
"""Files of a model folder that make the model: config, weights, tokenizer and code files
(README, .git and other folders are not part of it)."""


def cache_path() -> Path:
    configured = os.environ.get("DIST_SENSE_CACHE")
    base = Path(configured) if configured else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dist_sense"
    return base / "fingerprints.json"


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def _load_cache() -> dict:
    if not _MEMORY:
        try:
            _MEMORY.update(json.loads(cache_path().read_text()))
        except (OSError, ValueError):
            pass
    return _MEMORY


def _save_cache(cache: dict) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: digests are recomputed next time, nothing else changes


def file_digest(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes, from the cache when its size, times and inode are unchanged."""
    path = Path(path).resolve()
    key = _stat_key(path)
    with _LOCK:
        cached = _load_cache().get(str(path))
    if cached and cached.get("stat") == key:
        return cached["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            digest.update(block)
    value = digest.hexdigest()
    if _stat_key(path) == key:  # not changed while it was read
        with _LOCK:
            cache = _load_cache()
            cache[str(path)] = {"stat": key, "sha256": value}
            _save_cache(cache)
    return value


def tree_files(root: str | os.PathLike, suffixes: tuple[str, ...] | None = None) -> list[Path]:
    """A file, or the regular files of a folder (top level, not hidden), sorted by name."""
    root = Path(root)
    if root.is_file():
        return [root]
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    if suffixes is not None:
        files = [p for p in files if p.suffix.lower() in suffixes]
    return files


def tree_fingerprint(root: str | os.PathLike, suffixes: tuple[str, ...] | None = None) -> str:
    """Id of a file or a folder's files: their names and byte digests (16 hex digits)."""
    root = Path(root)
    parts = [(p.name, file_digest(p)) for p in tree_files(root, suffixes)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """Id of a model folder by content: config, weight, tokenizer and code files."""
    return tree_fingerprint(model_dir, MODEL_SUFFIXES)


def corpus_fingerprint(path: str | os.PathLike) -> str:
    """Id of a corpus by content: the file, or every file of its folder (a save_to_disk folder too).

    A saved dataset keeps its data in .arrow files and its layout in JSON files next to
    them; all regular files are hashed, in name order."""
    root = Path(path)
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        parts = [(str(p.relative_to(root)), file_digest(p)) for p in files]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
    return tree_fingerprint(root)


def differences(recorded: dict, current: dict) -> list[str]:
    """'key: was A, now B' for every key whose value differs (sorted), keys of nested dicts dotted."""
    out = []
    for key in sorted(set(recorded) | set(current)):
        was, now = recorded.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(was, dict) and isinstance(now, dict):
            out += [f"{key}.{line}" for line in differences(was, now)]
        elif was != now:
            out.append(f"{key}: was {_short(was)}, now {_short(now)}")
    return out


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
