"""One resumable pass of the ZeRO-3 teacher over this rank's windows, writing shards.

Shared by extraction and labelling: they differ only in what they write per window
(a `sink`). This module owns the parts that must be right once:
  - lockstep forwards (teacher.run_lockstep), so uneven ranks never hang;
  - batches of similar-length windows (corpus.length_sorted_batches), and shards closed
    only at the end of a sorted pool, so a resume re-forms exactly the same batches (same
    padding, same numerics) and the output is bitwise that of an uninterrupted run;
  - a per-rank progress file, updated after each closed shard, holding the windows
    consumed and the counters so far: the resume point; and beside it one record per
    commit, so a shard deleted or cut short later rolls the rank back to just before it
    (RankProgress), and `missing_shards` tells a finished stage whose shards are gone.
"""
from __future__ import annotations

import json
import os
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

log = comm.get_logger("dist_sense.teacher_pass")


class Sink(Protocol):
    """What a stage does with a batch's teacher states."""

    def write_batch(self, writer: RankShardWriter, windows: list[corpus.Window], states,
                    counters: dict[str, Counter]) -> None:
        """`states` [B, L, d] float32 numpy, row i valid for its window's len(input_ids) positions."""


class RankProgress:
    """One rank's closed shards, windows consumed and counters: its resume point.

    progress-rRRR.json holds what readers use: the closed shards' entries, `windows_done` and
    the counters merged so far. Beside it, progress-rRRR.commits.jsonl holds one line per
    commit, {"shard": its file or null, "windows_end", "counters": what that commit added},
    of which the JSON file counts the first `journal_bytes` (a line a crash left after them
    is overwritten by the next commit). With these the state before any shard can be rebuilt:
    on load, the first recorded shard that is missing or not of its recorded size rolls this
    rank back to just before it, so a rerun rewrites it and everything after, byte for byte.
    The lines live in their own file because shard entries go into the manifest as they are,
    and per-shard counters (one count per token kept) in a JSON file rewritten at every
    commit would make the writes grow with the square of the shard count.
    """

    def __init__(self, out_dir: Path, rank: int, world_size: int, settings: dict):
        self.out_dir, self.rank = Path(out_dir), rank
        self.path = self.out_dir / f"progress-r{rank:03d}.json"
        self.journal = self.out_dir / f"progress-r{rank:03d}.commits.jsonl"
        self.state = _fresh_state(world_size, settings)
        if self.path.is_file():
            self.state = self._load(world_size, settings)
            self._check_shards()

    def _load(self, world_size: int, settings: dict) -> dict:
        try:
            saved = json.loads(self.path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ManifestError(f"{self.path}: not valid JSON ({err}); delete {self.out_dir} to start over") from None
        if saved.get("settings") != settings:
            raise ManifestError(f"{self.path}: this rank's partial output was made with other settings; "
                                f"delete {self.out_dir} to start over")
        if saved.get("world_size") != world_size:
            raise ManifestError(f"{self.path}: started with {saved.get('world_size')} ranks, now {world_size}; "
                                f"rerun with {saved.get('world_size')} ranks or delete {self.out_dir}")
        return saved

    def counters(self) -> dict[str, Counter]:
        return {name: Counter(values) for name, values in self.state["counters"].items()}

    def commit(self, shard: dict | None, windows: int, pending: dict[str, Counter]) -> None:
        """Fold `pending` and (if any) a newly closed shard into the files: the journal line first,
        then the JSON file atomically (which makes the line count)."""
        end = self.state["windows_done"] + windows
        record = {"shard": shard["file"] if shard is not None else None, "windows_end": end,
                  "counters": _fold({}, pending)}
        line = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()
        at = self.state.get("journal_bytes", 0)
        self.state["journal_bytes"] = _write_at(self.journal, at, line)
        self.state["counters"] = _fold(self.state["counters"], pending)
        if shard is not None:
            self.state["shards"].append(shard)
        self.state["windows_done"] = end
        atomic_write_json(self.path, self.state)

    def _check_shards(self) -> None:
        """Roll back past the first recorded shard that is missing or not of its recorded size."""
        shards = self.state["shards"]
        found = next(((i, why) for i, entry in enumerate(shards) if (why := shard_problem(self.out_dir, entry))), None)
        if found is None:
            return
        index, problem = found
        records = self._read_journal()
        closing = [i for i, (record, _) in enumerate(records or []) if record["shard"] is not None]
        if (records is None or [records[i][0]["shard"] for i in closing] != [entry["file"] for entry in shards]
                or (records and records[-1][0]["windows_end"] != self.state["windows_done"])):
            self._restart(problem)
            return
        self._roll_back(index, records[: closing[index]], problem)

    def _roll_back(self, index: int, kept: list[tuple[dict, int]], problem: str) -> None:
        dropped, before = self.state["shards"][index:], self.state["windows_done"]
        for entry in dropped:  # the later ones are rewritten identically; deleting them first is crash-safe
            (self.out_dir / entry["file"]).unlink(missing_ok=True)
        merged: dict = {}
        for record, _ in kept:
            merged = _fold(merged, record["counters"])
        self.state.update(shards=self.state["shards"][:index], counters=merged,
                          windows_done=kept[-1][0]["windows_end"] if kept else 0,
                          journal_bytes=kept[-1][1] if kept else 0)
        with open(self.journal, "r+b") as f:
            f.truncate(self.state["journal_bytes"])
        atomic_write_json(self.path, self.state)
        log.warning("%s; rank %d rolls back to before it: %d shard(s) from %s on are rewritten and %d windows redone",
                    problem, self.rank, len(dropped), dropped[0]["file"], before - self.state["windows_done"])

    def _restart(self, problem: str) -> None:
        """No usable commit lines (a progress file from before they existed, or a lost journal):
        this rank's output is deleted and made again from its first window."""
        shards = self.state["shards"]
        for entry in shards:
            (self.out_dir / entry["file"]).unlink(missing_ok=True)
        self.journal.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)
        log.warning("%s, and %s has no usable per-commit records to roll back with (it predates them, or %s is "
                    "missing or damaged); rank %d starts over from its first window (%d shards deleted)",
                    problem, self.path.name, self.journal.name, self.rank, len(shards))
        self.state = _fresh_state(self.state["world_size"], self.state["settings"])

    def _read_journal(self) -> list[tuple[dict, int]] | None:
        """[(commit record, journal offset after it)] for the counted bytes; None if they are unreadable."""
        size = self.state.get("journal_bytes")
        try:
            with open(self.journal, "rb") as f:
                data = f.read(size) if isinstance(size, int) else b""
        except FileNotFoundError:
            return None
        if not isinstance(size, int) or len(data) != size:
            return None
        records, at = [], 0
        for line in data.splitlines(keepends=True):
            at += len(line)
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                return None
            if not isinstance(record, dict) or not {"shard", "windows_end", "counters"} <= set(record):
                return None
            records.append((record, at))
        return records


def _fresh_state(world_size: int, settings: dict) -> dict:
    return {"world_size": world_size, "settings": settings, "windows_done": 0, "shards": [], "counters": {},
            "journal_bytes": 0}


def _fold(merged: dict, delta: dict) -> dict:
    """`merged` plus `delta` ({name: {key: count}}), as JSON-ready dicts with keys in a fixed order."""
    total = {name: Counter(values) for name, values in merged.items()}
    for name, values in delta.items():
        total.setdefault(name, Counter()).update(values)
    return {name: dict(sorted(c.items(), key=lambda kv: str(kv[0]))) for name, c in total.items()}


def _write_at(path: Path, at: int, data: bytes) -> int:
    """Write `data` at offset `at` of `path`, cut the file there and fsync; returns the new end."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, at)
        os.ftruncate(fd, at + len(data))
        os.fsync(fd)
    finally:
        os.close(fd)
    return at + len(data)


def shard_problem(out_dir: Path, entry: dict) -> str | None:
    """Why the shard of a progress or manifest entry ({"file", maybe "bytes"}) is not as it was
    written (missing, or another size), or None. Cheap: a stat, no reading."""
    path = Path(out_dir) / entry["file"]
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path} is missing"
    expected = entry.get("bytes")
    if isinstance(expected, int) and size != expected:
        return f"{path} has {size} bytes, {expected} were written"
    return None


def missing_shards(out_dir: Path, manifest: dict) -> list[str]:
    """The "file" names of the shards a finished stage's manifest lists that are missing or not
    of their recorded size (shard_problem); empty when all are in place."""
    return [entry["file"] for entry in manifest.get("shards", []) if shard_problem(out_dir, entry)]


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
    windows = corpus.iter_windows(docs, teacher.tokenizer, corpus_cfg.max_length, corpus_cfg.stride, teacher.instruction)
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
