"""One resumable pass of the ZeRO-3 teacher over this rank's windows, writing shards.

Shared by extraction and labelling: they differ only in what they write per window
(a `sink`). This module owns the parts that must be right once:
  - lockstep forwards (teacher.run_lockstep), so uneven ranks never hang;
  - batches of similar-length windows (corpus.length_sorted_batches), and shards closed
    only at the end of a sorted pool, so a resume re-forms exactly the same batches (same
    padding, same numerics) and the output is bitwise that of an uninterrupted run;
  - a per-rank progress file, updated after each closed shard, holding the windows
    consumed and the counters so far: the resume point.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from dist_sense import comm
from dist_sense.formats import corpus
from dist_sense.formats.manifest import ManifestError, atomic_write_json
from dist_sense.formats.shards import RankShardWriter
from dist_sense.model.teacher import Teacher, run_lockstep
from dist_sense.runtime.faults import crash_point
from dist_sense.runtime.metrics import summary_writer


class Sink(Protocol):
    """What a stage does with a batch's teacher states."""

    def write_batch(self, writer: RankShardWriter, windows: list[corpus.Window], states,
                    counters: dict[str, Counter]) -> None:
        """`states` [B, L, d] float32 numpy, row i valid for its window's len(input_ids) positions."""


class RankProgress:
    """One rank's closed shards, windows consumed and counters: its resume point."""

    def __init__(self, out_dir: Path, rank: int, world_size: int, settings: dict):
        self.path = out_dir / f"progress-r{rank:03d}.json"
        self.state = {"world_size": world_size, "settings": settings, "windows_done": 0, "shards": [], "counters": {}}
        if self.path.is_file():
            saved = json.loads(self.path.read_text())
            if saved.get("settings") != settings:
                raise ManifestError(f"{self.path}: this rank's partial output was made with other settings; "
                                    f"delete {out_dir} to start over")
            if saved.get("world_size") != world_size:
                raise ManifestError(f"{self.path}: started with {saved.get('world_size')} ranks, now {world_size}; "
                                    f"rerun with {saved.get('world_size')} ranks or delete {out_dir}")
            self.state = saved

    def counters(self) -> dict[str, Counter]:
        return {name: Counter(values) for name, values in self.state["counters"].items()}

    def commit(self, shard: dict | None, windows: int, pending: dict[str, Counter]) -> None:
        """Fold `pending` and (if any) a newly closed shard into the file, atomically."""
        merged = self.counters()
        for name, values in pending.items():
            merged.setdefault(name, Counter()).update(values)
        self.state["counters"] = {name: dict(sorted(c.items(), key=lambda kv: str(kv[0]))) for name, c in merged.items()}
        if shard is not None:
            self.state["shards"].append(shard)
        self.state["windows_done"] += windows
        atomic_write_json(self.path, self.state)


def gather_progress(out_dir: Path, settings: dict) -> list[dict]:
    """Every rank's progress state (call on all ranks; each reads its own file)."""
    env = comm.detect()
    return comm.all_gather_object(RankProgress(out_dir, env.rank, env.world_size, settings).state)


def merge_counters(states: list[dict]) -> dict[str, Counter]:
    total: dict[str, Counter] = {}
    for state in states:
        for name, values in state["counters"].items():
            total.setdefault(name, Counter()).update(values)
    return total


def run_pass(
    teacher: Teacher, dataset, corpus_cfg, out_dir: Path, prefix: str, settings: dict, sink: Sink,
    batch_size: int, shard_samples: int, tb_dir: Path, expected_tokens: int = 0,
) -> None:
    """Run this rank's share of `dataset` through the teacher into `out_dir`/`prefix`-rRRR-*.tar."""
    env = comm.detect()
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = RankProgress(out_dir, env.rank, env.world_size, settings)
    for stale in out_dir.glob(f".{prefix}-r{env.rank:03d}-*.partial"):
        stale.unlink()  # the shard being written when the last run died
    writer = RankShardWriter(out_dir, prefix, env.rank, shard_samples, first_index=len(progress.state["shards"]),
                             close_when_full=False)
    docs = corpus.documents_for_rank(dataset, env.rank, env.world_size)
    windows = corpus.iter_windows(docs, teacher.tokenizer, corpus_cfg.max_length, corpus_cfg.stride)
    batches = corpus.length_sorted_batches(_skip(windows, progress.state["windows_done"]), batch_size)
    pad = teacher.tokenizer.pad_token_id
    tb = summary_writer(tb_dir.parent, tb_dir.name)
    bar = tqdm(total=expected_tokens // env.world_size or None, unit="tok", disable=not env.is_main, desc=prefix)
    pending: dict[str, Counter] = {}

    def write_batch(windows: list, states) -> None:
        sink.write_batch(writer, windows, states, pending)
        pending.setdefault("totals", Counter()).update(windows=len(windows), tokens=sum(sum(w.owned) for w in windows))
        for _ in windows:
            crash_point(f"{prefix}.window")

    n_windows, start, step = 0, time.time(), 0
    # With a GPU teacher the CPU is idle during the forward: sampling, encoding and shard writing
    # run on one background thread meanwhile, in order (one worker, so the shards are the same)
    # and drained at every pool's end, the only place a shard may close. A CPU forward already
    # keeps every core busy; a writer thread only contends with it (measured slower), so inline.
    overlap = torch.device(teacher.device).type == "cuda"
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{prefix}-writer") if overlap else _Inline()
    with executor as background:
        in_flight = []
        for batch, hidden in run_lockstep(teacher, batches, lambda b: corpus.batch_windows(b.windows, pad), batch_size):
            in_flight.append(background.submit(write_batch, batch.windows, hidden.cpu().numpy()))
            n_windows += len(batch.windows)
            bar.update(sum(sum(w.owned) for w in batch.windows))
            if batch.closes_pool:
                for job in in_flight:
                    job.result()  # re-raises a writer's error here
                in_flight = []
                if writer.full:  # a resume must restart at a pool, to form the same batches
                    writer.close_shard()
                    progress.commit(writer.written[-1], n_windows, pending)
                    pending, n_windows = {}, 0
                    crash_point(f"{prefix}.commit")
            step += 1
            if step % 10 == 0:
                tb.add_scalar("speed/tokens_per_s", bar.n / max(time.time() - start, 1e-9), step)
        for job in in_flight:
            job.result()
    closed = len(writer.written)
    writer.close()
    if len(writer.written) > closed or n_windows:
        progress.commit(writer.written[-1] if len(writer.written) > closed else None, n_windows, pending)
    bar.close()
    tb.close()


class _Inline:
    """An executor that runs each job when it is submitted."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def submit(self, fn, *args) -> Future:
        done: Future = Future()
        done.set_result(fn(*args))
        return done


def _skip(windows, n: int):
    for i, window in enumerate(windows):
        if i >= n:
            yield window
