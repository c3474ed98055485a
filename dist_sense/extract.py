"""Stage 1: run the teacher under ZeRO-3 and keep a capped sample of its hidden states.

An occurrence of token t (document d, position p) is kept with probability
min(1, cap / count_t). The draw is a hash of (seed, d, p), not a random stream, so
the kept set does not depend on how documents are split over ranks, nor on resume.
Output: RUN/hidden/ webdataset shards (one sample per window, see shards.py) and
RUN/hidden/manifest.json, written last. Each rank records its progress after every
closed shard, so a rerun skips finished windows and ends with the same shards.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import corpus, dist
from .config import ConfigError, RunConfig
from .counts import run_counts
from .faults import crash_point
from .manifest import ManifestError, atomic_write_json, read_manifest, write_manifest
from .metrics import summary_writer
from .shards import HIDDEN_FORMAT, HIDDEN_VERSION, RankShardWriter, encode_hidden, npy_bytes
from .teacher import Teacher, run_lockstep

log = dist.get_logger("dist_sense.extract")


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


def keep_mask(window: corpus.Window, prob: np.ndarray, seed: int) -> np.ndarray:
    """Positions of `window` (over its input ids) whose occurrence is kept."""
    ids = np.asarray(window.input_ids)
    doc_pos = np.asarray(window.doc_pos)
    eligible = np.asarray(window.owned) & ~np.asarray(window.special)
    draw = uniform_draw(seed, np.full(len(ids), window.doc), np.maximum(doc_pos, 0))
    return eligible & (draw < prob[ids])


def banned_token_ids(tokenizer, stop_tokens) -> set[int]:
    banned = set(tokenizer.all_special_ids)
    vocab = tokenizer.get_vocab()
    for tok in stop_tokens:
        if tok not in vocab:
            raise ConfigError(f"extract.stop_tokens: {tok!r} is not a token of the tokenizer")
        banned.add(vocab[tok])
    return banned


def extract_settings(cfg: RunConfig, teacher: Teacher, corpus_path: str) -> dict:
    """Everything the shards depend on; resuming with other settings is refused."""
    return {
        "corpus": str(Path(corpus_path).resolve()), "text_field": cfg.corpus.text_field,
        "max_length": cfg.corpus.max_length, "stride": cfg.corpus.stride, "max_documents": cfg.corpus.max_documents,
        "cap": cfg.extract.cap, "seed": cfg.extract.seed, "stop_tokens": sorted(cfg.extract.stop_tokens),
        "hidden_dtype": cfg.extract.hidden_dtype, "teacher_fingerprint": teacher.fingerprint,
        "tokenizer_fingerprint": teacher.tokenizer_fingerprint, "layer": teacher.layer, "dtype": teacher.dtype,
    }


class RankProgress:
    """One rank's record of closed shards, windows consumed and kept counts: the resume point."""

    def __init__(self, out_dir: Path, rank: int, world_size: int, settings: dict):
        self.path = out_dir / f"progress-r{rank:03d}.json"
        self.state = {"world_size": world_size, "settings": settings, "windows_done": 0, "shards": [],
                      "kept": {}, "tokens_read": 0, "nonfinite": 0}
        if self.path.is_file():
            saved = json.loads(self.path.read_text())
            if saved.get("settings") != settings:
                raise ManifestError(f"{self.path}: this rank's partial output was made with other settings; "
                                    f"delete {out_dir} to start over")
            if saved.get("world_size") != world_size:
                raise ManifestError(f"{self.path}: started with {saved.get('world_size')} ranks, now {world_size}; "
                                    f"rerun with {saved.get('world_size')} ranks or delete {out_dir}")
            self.state = saved

    def save(self) -> None:
        atomic_write_json(self.path, self.state)


def run(cfg: RunConfig) -> Path:
    """Extract capped hidden states into RUN/hidden/ and return that directory."""
    env = dist.init_torch()
    out_dir = cfg.run_path / "hidden"
    corpus_path = cfg.corpus.path
    dataset = corpus.load_documents(corpus_path, cfg.corpus.text_field, cfg.corpus.max_documents)
    teacher = Teacher(cfg.model, cfg.extract.ds_config, cfg.extract.batch_size, cfg.extract.offload, cfg.extract.nvme_path)
    settings = extract_settings(cfg, teacher, corpus_path)
    if env.is_main:
        cfg.save()
    if _is_complete(out_dir, settings):
        log.info("%s is complete for these settings; nothing to do", out_dir)
        return out_dir
    counts = run_counts(cfg, dataset, teacher.tokenizer, teacher.tokenizer_fingerprint, corpus_path)
    prob = keep_probability(counts, cfg.extract.cap, banned_token_ids(teacher.tokenizer, cfg.extract.stop_tokens))
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = RankProgress(out_dir, env.rank, env.world_size, settings)
    _extract_rank(cfg, teacher, dataset, prob, progress, out_dir, total_tokens=int(counts.sum()))
    dist.barrier()
    _write_manifest(cfg, teacher, settings, out_dir, counts)
    dist.barrier()
    return out_dir


def _is_complete(out_dir: Path, settings: dict) -> bool:
    try:
        manifest = read_manifest(out_dir, HIDDEN_FORMAT, HIDDEN_VERSION)
    except ManifestError:
        return False
    if manifest.get("settings") != settings:
        raise ManifestError(f"{out_dir / 'manifest.json'}: made with other settings; use another run_dir or delete {out_dir}")
    return True


def _extract_rank(cfg, teacher, dataset, prob, progress: RankProgress, out_dir: Path, total_tokens: int) -> None:
    env = dist.detect()
    state = progress.state
    for stale in out_dir.glob(f".hidden-r{env.rank:03d}-*.partial"):
        stale.unlink()  # a shard that was being written when the last run died
    # Shards close only between batches, so a resume re-forms exactly the same batches
    # (same padding, same numerics) and the result is bitwise the uninterrupted one.
    writer = RankShardWriter(out_dir, "hidden", env.rank, cfg.extract.shard_samples, first_index=len(state["shards"]),
                             close_when_full=False)
    docs = corpus.documents_for_rank(dataset, env.rank, env.world_size)
    windows = corpus.iter_windows(docs, teacher.tokenizer, cfg.corpus.max_length, cfg.corpus.stride)
    skipped = _skip(windows, state["windows_done"])
    batches = _batches(skipped, cfg.extract.batch_size)
    pad = teacher.tokenizer.pad_token_id
    tb = summary_writer(cfg.run_path, "extract")
    bar = tqdm(total=total_tokens // env.world_size, unit="tok", disable=not env.is_main, desc="extract")
    pending = {"windows": 0, "kept": Counter(), "tokens": 0, "nonfinite": 0}
    start, step = time.time(), 0
    for batch, hidden in run_lockstep(teacher, batches, lambda b: corpus.batch_windows(b, pad), cfg.extract.batch_size):
        for window, states in zip(batch, hidden.cpu().numpy()):
            _write_window(writer, window, states, prob, cfg, pending)
        if writer.full:  # a resume point
            writer.close_shard()
            _commit(progress, writer.written[-1], pending)
        n_tokens = sum(int(np.sum(w.owned)) for w in batch)
        bar.update(n_tokens)
        step += 1
        if env.is_main and step % 10 == 0:
            tb.add_scalar("speed/tokens_per_s", bar.n / max(time.time() - start, 1e-9), step)
            tb.add_scalar("extract/vectors_kept_rank0", sum(state["kept"].values()) + sum(pending["kept"].values()), step)
    closed_before = len(writer.written)
    writer.close()
    if len(writer.written) > closed_before:
        _commit(progress, writer.written[-1], pending)
    elif pending["windows"]:
        _commit(progress, None, pending)  # windows that kept nothing since the last shard
    bar.close()
    tb.close()


def _write_window(writer, window, states: np.ndarray, prob, cfg, pending) -> None:
    n = len(window.input_ids)
    pending["windows"] += 1
    pending["tokens"] += int(np.sum(window.owned))
    mask = keep_mask(window, prob, cfg.extract.seed)
    vectors = states[:n][mask]
    finite = np.isfinite(vectors).all(axis=1)
    pending["nonfinite"] += int((~finite).sum())  # never clustered: dropped here and counted
    pos = np.flatnonzero(mask)[finite]
    if len(pos) == 0:
        return
    tokens = np.asarray(window.input_ids, dtype=np.int32)[pos]
    pending["kept"].update(tokens.tolist())
    doc = {"doc": window.doc, "window": window.index, "start": window.start, "text": window.text,
           "spans": [list(window.spans[p]) for p in pos]}
    writer.write(f"{window.doc:010d}_{window.index:05d}", {
        "tokens.npy": npy_bytes(tokens), "hidden.npy": npy_bytes(encode_hidden(vectors[finite], cfg.extract.hidden_dtype)),
        "pos.npy": npy_bytes(pos.astype(np.int32)), "doc.json": json.dumps(doc).encode(),
    })
    crash_point("extract.window")


def _commit(progress: RankProgress, shard: dict | None, pending: dict) -> None:
    """Fold everything since the last commit into the rank's progress file."""
    state = progress.state
    if shard is not None:
        state["shards"].append(shard)
    state["windows_done"] += pending["windows"]
    state["tokens_read"] += pending["tokens"]
    state["nonfinite"] += pending["nonfinite"]
    kept = Counter({int(k): v for k, v in state["kept"].items()})
    kept.update(pending["kept"])
    state["kept"] = {str(k): v for k, v in sorted(kept.items())}
    progress.save()
    pending.update(windows=0, kept=Counter(), tokens=0, nonfinite=0)
    crash_point("extract.commit")


def _write_manifest(cfg, teacher: Teacher, settings: dict, out_dir: Path, counts: np.ndarray) -> None:
    states = dist.all_gather_object(RankProgress(out_dir, dist.detect().rank, dist.detect().world_size, settings).state)
    if not dist.detect().is_main:
        return
    kept: Counter = Counter()
    for s in states:
        kept.update({int(k): v for k, v in s["kept"].items()})
    shards = [shard for s in states for shard in s["shards"]]
    totals = {
        "tokens_read": sum(s["tokens_read"] for s in states), "windows": sum(s["windows_done"] for s in states),
        "vectors_kept": sum(kept.values()), "distinct_tokens": len(kept), "nonfinite_skipped": sum(s["nonfinite"] for s in states),
        "corpus_tokens": int(counts.sum()),
    }
    body = {
        "teacher": str(teacher.path), "teacher_fingerprint": teacher.fingerprint,
        "tokenizer_fingerprint": teacher.tokenizer_fingerprint, "layer": teacher.layer, "d": teacher.d,
        "dtype": cfg.extract.hidden_dtype, "vocab_size": len(counts), "settings": settings, "totals": totals,
        "kept_per_token": {str(k): v for k, v in sorted(kept.items())}, "shards": sorted(shards, key=lambda s: s["file"]),
        "world_size": dist.detect().world_size,
    }
    write_manifest(out_dir, HIDDEN_FORMAT, HIDDEN_VERSION, body)
    tb = summary_writer(cfg.run_path, "extract")
    tb.add_scalar("extract/vectors_kept", totals["vectors_kept"], 0)
    tb.add_scalar("extract/distinct_tokens", totals["distinct_tokens"], 0)
    tb.close()
    log.info("wrote %s: %d vectors of %d tokens from %d tokens read", out_dir, totals["vectors_kept"],
             totals["distinct_tokens"], totals["tokens_read"])


def _skip(windows, n: int):
    for i, window in enumerate(windows):
        if i >= n:
            yield window


def _batches(windows, size: int):
    batch = []
    for window in windows:
        batch.append(window)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
