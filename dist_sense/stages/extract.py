"""Stage 1: run the teacher under ZeRO-3 and keep a capped sample of its hidden states.

An occurrence of token t (document d, position p) is kept with probability
min(1, cap / count_t). The draw is a hash of (seed, d, p), not a random stream, so
the kept set does not depend on how documents are split over ranks, nor on resume.
Output: RUN/hidden/ webdataset shards (one sample per window, see shards.py) and
RUN/hidden/manifest.json, written last. Resume and lockstep live in teacher_pass.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from dist_sense import comm
from dist_sense.config import ConfigError, RunConfig
from dist_sense.formats import corpus
from dist_sense.formats.identity import corpus_fingerprint
from dist_sense.formats.manifest import write_manifest
from dist_sense.formats.shards import HIDDEN_FORMAT, HIDDEN_VERSION, encode_hidden, hidden_sample
from dist_sense.model.teacher import Teacher
from dist_sense.runtime.metrics import summary_writer
from dist_sense.stages.counts import run_counts
from dist_sense.stages.guard import finished_and_whole, open_stage
from dist_sense.stages.teacher_pass import gather_progress, merge_counters, run_pass

log = comm.get_logger("dist_sense.extract")


def uniform_draw(seed: int, doc: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) per (seed, doc, pos): splitmix64 over a mixed key."""
    with np.errstate(over="ignore"):
        x = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)) ^ (doc.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9))
        x = x + pos.astype(np.uint64) * np.uint64(0x94D049BB133111EB) + np.uint64(0x632BE59BD9B4E019)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def keep_probability(counts: np.ndarray, cap: int, banned_ids) -> np.ndarray:
    """min(1, cap / count) per token; 0 for special, padding and stop tokens."""
    prob = np.minimum(1.0, cap / np.maximum(counts, 1)).astype(np.float64)
    prob[list(banned_ids)] = 0.0
    return prob


def window_arrays(windows: list[corpus.Window], length: int):
    """(ids, doc, doc_pos, eligible) [B, length] int64/bool arrays of a batch; padding is not eligible."""
    ids = np.zeros((len(windows), length), dtype=np.int64)
    doc = np.zeros_like(ids)
    pos = np.zeros_like(ids)
    eligible = np.zeros(ids.shape, dtype=bool)
    for row, window in enumerate(windows):
        n = len(window.input_ids)
        ids[row, :n] = window.input_ids
        doc[row, :n] = window.doc
        pos[row, :n] = window.doc_pos
        eligible[row, :n] = np.asarray(window.owned) & ~np.asarray(window.special)
    return ids, doc, pos, eligible


def batch_keep_mask(ids, doc, pos, eligible, prob: np.ndarray, seed: int) -> np.ndarray:
    """[B, L] kept occurrences: eligible, and the (seed, doc, position) draw under the token's keep probability."""
    return eligible & (uniform_draw(seed, doc, np.maximum(pos, 0)) < prob[ids])


def banned_token_ids(tokenizer, stop_tokens) -> set[int]:
    banned = set(tokenizer.all_special_ids)
    vocab = tokenizer.get_vocab()
    for tok in stop_tokens:
        if tok not in vocab:
            raise ConfigError(f"extract.stop_tokens: {tok!r} is not a token of the tokenizer")
        banned.add(vocab[tok])
    return banned


def extract_settings(cfg: RunConfig, teacher: Teacher, corpus_path: str) -> dict:
    """Everything the shards depend on (the corpus and the teacher by content); a rerun with other settings is refused."""
    return {
        "corpus_fingerprint": corpus_fingerprint(corpus_path),
        "text_field": cfg.corpus.text_field,
        "max_length": cfg.corpus.max_length, "stride": cfg.corpus.stride, "max_documents": cfg.corpus.max_documents,
        "cap": cfg.extract.cap, "seed": cfg.extract.seed, "stop_tokens": sorted(cfg.extract.stop_tokens),
        "hidden_dtype": cfg.extract.hidden_dtype, "teacher_fingerprint": teacher.fingerprint,
        "tokenizer_fingerprint": teacher.tokenizer_fingerprint, "layer": teacher.layer, "dtype": teacher.dtype,
        "instruction": teacher.instruction, "bidirectional": teacher.bidirectional,
    }


class HiddenSink:
    """Writes the kept occurrences of each window as one hidden/ sample (see shards.py)."""

    def __init__(self, prob: np.ndarray, seed: int, hidden_dtype: str):
        self.prob, self.seed, self.hidden_dtype = prob, seed, hidden_dtype

    def write_batch(self, writer, windows: list[corpus.Window], states: np.ndarray, counters: dict[str, Counter]) -> None:
        # The draw, the selection and the fp16 cast run once over the whole batch [B, L, d]; only
        # the sample records are per window (a Python loop per window was ~40% of a CPU pass).
        ids, doc, pos, eligible = window_arrays(windows, states.shape[1])
        keep = batch_keep_mask(ids, doc, pos, eligible, self.prob, self.seed)
        rows, cols = np.nonzero(keep)
        vectors = states[rows, cols]
        finite = np.isfinite(vectors).all(axis=1)
        # Non-finite states are dropped here and counted, so they are never clustered.
        counters.setdefault("totals", Counter())["nonfinite"] += int((~finite).sum())
        rows, cols = rows[finite], cols[finite]
        if len(rows) == 0:
            return
        encoded = encode_hidden(vectors[finite], self.hidden_dtype)
        tokens = ids[rows, cols]
        kinds, times = np.unique(tokens, return_counts=True)
        counters.setdefault("kept", Counter()).update(dict(zip(map(str, kinds.tolist()), times.tolist())))
        ends = np.cumsum(np.bincount(rows, minlength=len(windows)))
        start = 0
        for window, end in zip(windows, ends.tolist()):
            if end == start:
                continue
            at = cols[start:end]
            doc = {"doc": window.doc, "window": window.index, "start": window.start, "text": window.text,
                   "spans": [window.spans[p] for p in at.tolist()]}
            writer.write(f"{window.doc:010d}_{window.index:05d}", hidden_sample(encoded[start:end], tokens[start:end], at, doc))
            start = end


def run(cfg: RunConfig, restart: bool = False) -> Path:
    """Extract capped hidden states into RUN/hidden/ and return that directory.

    restart: move a hidden/ made from other inputs or settings aside instead of refusing (--restart-stage)."""
    env = comm.init_torch()
    out_dir = cfg.run_path / "hidden"
    corpus_path = cfg.corpus.path
    dataset = corpus.load_documents(corpus_path, cfg.corpus.text_field, cfg.corpus.max_documents)
    teacher = Teacher(cfg.model, cfg.extract.ds_config, cfg.extract.batch_size, cfg.extract.offload, cfg.extract.nvme_path,
                      cfg.extract.partition, max_length=cfg.corpus.max_length)
    settings = extract_settings(cfg, teacher, corpus_path)
    with open_stage(cfg, "extract", out_dir, settings, restart=restart, rank=env.rank, share=comm.broadcast_object) as stage:
        if finished_and_whole(out_dir, HIDDEN_FORMAT, HIDDEN_VERSION, settings, env.rank, comm.broadcast_object):
            log.info("%s is complete for these settings; nothing to do", out_dir)
            return out_dir
        stage.begin()
        counts = run_counts(cfg, dataset, teacher.tokenizer, teacher.tokenizer_fingerprint, corpus_path,
                            settings["corpus_fingerprint"])
        prob = keep_probability(counts, cfg.extract.cap, banned_token_ids(teacher.tokenizer, cfg.extract.stop_tokens))
        sink = HiddenSink(prob, cfg.extract.seed, cfg.extract.hidden_dtype)
        run_pass(teacher, dataset, cfg.corpus, out_dir, "hidden", settings, sink, cfg.extract.batch_size,
                 cfg.extract.shard_samples, cfg.run_path / "tb" / "extract", expected_tokens=int(counts.sum()))
        comm.barrier()
        _write_manifest(cfg, teacher, settings, out_dir, counts)
        comm.barrier()
    return out_dir


def _write_manifest(cfg, teacher: Teacher, settings: dict, out_dir: Path, counts: np.ndarray) -> None:
    states = gather_progress(out_dir, settings)
    if not comm.detect().is_main:
        return
    counters = merge_counters(states)
    kept = Counter({int(k): v for k, v in counters.get("kept", {}).items()})
    shards = [shard for s in states for shard in s["shards"]]
    read = counters.get("totals", Counter())
    totals = {
        "tokens_read": read["tokens"], "windows": read["windows"], "vectors_kept": sum(kept.values()),
        "distinct_tokens": len(kept), "nonfinite_skipped": read["nonfinite"], "corpus_tokens": int(counts.sum()),
    }
    body = {
        "teacher": str(teacher.path), "teacher_fingerprint": teacher.fingerprint,
        "corpus": str(Path(cfg.corpus.path).resolve()),
        "tokenizer_fingerprint": teacher.tokenizer_fingerprint, "layer": teacher.layer, "d": teacher.d,
        "dtype": cfg.extract.hidden_dtype, "vocab_size": len(counts), "settings": settings, "totals": totals,
        "kept_per_token": {str(k): v for k, v in sorted(kept.items())}, "shards": sorted(shards, key=lambda s: s["file"]),
        "world_size": comm.detect().world_size, "teacher_partition": "zero3" if teacher.partitioned else "replicate",
    }
    write_manifest(out_dir, HIDDEN_FORMAT, HIDDEN_VERSION, body)
    tb = summary_writer(cfg.run_path, "extract")
    tb.add_scalar("extract/vectors_kept", totals["vectors_kept"], 0)
    tb.add_scalar("extract/distinct_tokens", totals["distinct_tokens"], 0)
    tb.close()
    log.info("wrote %s: %d vectors of %d tokens from %d tokens read", out_dir, totals["vectors_kept"],
             totals["distinct_tokens"], totals["tokens_read"])
