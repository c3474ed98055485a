"""The counting pass: how often each vocabulary token occurs in the whole corpus.

Each rank counts the tokens of its own documents; one all-reduce sums them. The
result (RUN/counts/counts.npy, int64 over the vocabulary) sets the keep probability
min(1, cap / count) of the extraction pass. Counting is cheap (tokenisation only),
and a finished counts/ whose settings match is reused, not recomputed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dist_sense import comm
from dist_sense.config import RunConfig
from dist_sense.formats import corpus
from dist_sense.formats.manifest import ManifestError, atomic_write_bytes, read_manifest, write_manifest

COUNTS_FORMAT = "dist_sense.counts"
COUNTS_VERSION = 1


def counts_settings(cfg: RunConfig, tokenizer_fp: str, corpus_path: str, corpus_fp: str) -> dict:
    """What the counts depend on (the corpus by content); a counts/ made with other settings is recomputed."""
    c = cfg.corpus
    return {
        "corpus_fingerprint": corpus_fp, "text_field": c.text_field, "max_length": c.max_length,
        "stride": c.stride, "max_documents": c.max_documents, "tokenizer_fingerprint": tokenizer_fp,
    }


def load_counts(out_dir: Path, settings: dict) -> np.ndarray | None:
    """The saved counts if counts/ is complete and was made with `settings`, else None."""
    try:
        manifest = read_manifest(out_dir, COUNTS_FORMAT, COUNTS_VERSION)
    except ManifestError:
        return None
    if manifest.get("settings") != settings:
        return None
    return np.load(out_dir / "counts.npy")


def count_corpus(dataset, tokenizer, cfg: RunConfig) -> tuple[np.ndarray, dict]:
    """All-reduced token counts and totals over every rank's documents."""
    env = comm.detect()
    vocab_size = len(tokenizer)
    local = np.zeros(vocab_size, dtype=np.int64)
    n_windows = 0
    docs = corpus.documents_for_rank(dataset, env.rank, env.world_size)
    windows = corpus.iter_windows(docs, tokenizer, cfg.corpus.max_length, cfg.corpus.stride, cfg.model.instruction)
    for chunk in corpus.batched(windows, 256):
        local += corpus.count_tokens(chunk, vocab_size)
        n_windows += len(chunk)
    totals = comm.all_reduce_sum(torch.from_numpy(np.concatenate([local, [n_windows]]))).numpy()
    counts = totals[:vocab_size]
    return counts, {"tokens": int(counts.sum()), "windows": int(totals[-1]), "documents": len(dataset)}


def run_counts(cfg: RunConfig, dataset, tokenizer, tokenizer_fp: str, corpus_path: str, corpus_fp: str) -> np.ndarray:
    """Counts for `dataset`, reused from RUN/counts when complete and matching, else computed and saved."""
    out_dir = cfg.run_path / "counts"
    settings = counts_settings(cfg, tokenizer_fp, corpus_path, corpus_fp)
    # Every rank decides the same way (same files), so all or none enter the all-reduce.
    saved = load_counts(out_dir, settings)
    if saved is not None:
        return saved
    counts, totals = count_corpus(dataset, tokenizer, cfg)
    if comm.detect().is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_dir / "counts.npy", _npy(counts))
        body = {"settings": settings, "vocab_size": len(counts), "totals": totals, "distinct_tokens": int((counts > 0).sum())}
        write_manifest(out_dir, COUNTS_FORMAT, COUNTS_VERSION, body)
    comm.barrier()
    return counts


def _npy(array: np.ndarray) -> bytes:
    from dist_sense.formats.shards import npy_bytes

    return npy_bytes(array)
