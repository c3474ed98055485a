"""A rank's hidden rows bucketed by tile in scratch files, for build_dict.

How the reading is cut into claimable units (work_units), the subsample priority of each occurrence
(the same on any rank), and the scratch files that let each tile be read back alone,
with the example context of every row.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from . import shards

SPILL_BATCH_BYTES = 64 << 20
"""Spilled rows go to the scratch files in batches of at least this much (one append per tile a batch)."""

if TYPE_CHECKING:
    from .build_dict import TilePlan

CONTEXT_CHARS = 160
"""Characters of window text kept on each side of an example occurrence."""


def work_units(shard_samples: list[tuple[str, int]], unit: int, tail_samples: int = 0,
               tail_unit: int | None = None) -> list[tuple[str, int, int]]:
    """The reading split into (file, first sample, end sample) runs of at most `unit` samples, files in name order.

    Ranks claim these one at a time from a shared counter (build_dict), so a rank slowed by
    its data or its core just claims fewer: every rank must finish reading before the first
    tile's collective, and fixed shares left the others waiting for the slowest. The last
    `tail_samples` samples come in units of `tail_unit`, so the ranks' last claims are short
    and they finish closer together. Which rank reads a sample never changes the dictionary
    (see occurrence_priority).
    """
    total = sum(int(count) for _, count in shard_samples)
    tail_from, small = total - tail_samples, tail_unit or unit
    units, seen = [], 0
    for file, count in sorted(shard_samples):
        start = 0
        while start < int(count):
            stop = min(start + (unit if seen + start < tail_from else small), int(count))
            units.append((file, start, stop))
            start = stop
        seen += int(count)
    return units


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def occurrence_priority(seed: int, shard: str, key: str, positions: np.ndarray) -> np.ndarray:
    """uint64 draw per occurrence from (seed, shard, sample key, position) alone: the same on any rank."""
    base = hashlib.blake2b(f"{seed}:{shard}:{key}".encode(), digest_size=8).digest()
    return _splitmix64(np.uint64(int.from_bytes(base, "little")) ^ _splitmix64(np.asarray(positions, np.uint64)))


def mark_occurrence(doc: dict, occurrence: int) -> str:
    """The window text around one kept occurrence, the occurrence in [[ ]]."""
    text, spans = doc.get("text", ""), doc.get("spans") or []
    if occurrence >= len(spans):
        return text[: 2 * CONTEXT_CHARS]
    start, end = (int(v) for v in spans[occurrence])
    left, right = max(0, start - CONTEXT_CHARS), min(len(text), end + CONTEXT_CHARS)
    return ("..." if left else "") + f"{text[left:start]}[[{text[start:end]}]]{text[end:right]}" + ("..." if right < len(text) else "")


class TileSpill:
    """This rank's hidden rows bucketed by tile, so each tile is read back alone.

    One pass over the rank's shards replaces one pass per tile. Rows keep their storage
    dtype; beside each row go its token, its subsample priority and where its context
    is (a sample number into contexts.bin and the occurrence's index in that sample).
    Rows stay in memory up to `memory_bytes` (at least SPILL_BATCH_BYTES); past that, what
    is held is appended to per-tile scratch files and memory starts over, so memory stays bounded whatever the
    corpus, and a corpus that fits costs no scratch I/O (which, written and read back,
    took system time from both ranks of a 2-core run).
    """

    META = np.dtype([("token", "<i8"), ("priority", "<u8"), ("sample", "<i8"), ("occurrence", "<i4")])
    STORAGE = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16}

    def __init__(self, directory: Path, dtype: str, d: int, memory_bytes: int = 512 << 20):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        self.directory, self.dtype, self.d, self.memory_bytes = directory, dtype, d, memory_bytes
        self.doc_offsets = [0]
        self._pending: list = []
        self._pending_bytes = 0
        self._held: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # tile -> (rows, meta) kept in memory

    def fill(self, units: Iterable[tuple[Path, int, int]], plan: TilePlan, todo: list[int], seed: int,
             poll: Callable[[], object] = lambda: None) -> None:
        """Read (shard, first sample, end sample) units, as claimed, into the tile files of `todo`.

        `poll` runs after every sample (build_dict.SharedCounter.poll: lets MPI serve the other
        ranks' claims)."""
        tile_map = np.where(np.isin(plan.tile_of_token, todo), plan.tile_of_token, -1)
        offsets: dict[Path, list[int]] = {}  # per shard, so a unit starts at its first sample's header
        with open(self.directory / "contexts.bin", "wb") as contexts:
            for path, start, stop in units:
                if start > 0 and path not in offsets:
                    offsets[path] = shards.sample_offsets(path)
                for sample in shards.iter_hidden_range(path, start, stop, self.dtype, offsets.get(path)):
                    poll()
                    tokens = sample["tokens"]
                    inside = (tokens >= 0) & (tokens < len(tile_map))
                    tiles = np.where(inside, tile_map[np.where(inside, tokens, 0)], -1)
                    keep = np.flatnonzero(tiles >= 0)
                    if len(keep) == 0:
                        continue
                    doc = json.dumps(sample["doc"]).encode()
                    contexts.write(doc)
                    self.doc_offsets.append(self.doc_offsets[-1] + len(doc))
                    meta = np.zeros(len(keep), self.META)
                    meta["token"], meta["sample"], meta["occurrence"] = tokens[keep], len(self.doc_offsets) - 2, keep
                    meta["priority"] = occurrence_priority(seed, path.name, sample["key"], sample["pos"][keep])
                    self._add(tiles[keep], shards.encode_hidden(sample["hidden"][keep], self.dtype), meta)
        self.doc_offsets = np.asarray(self.doc_offsets, dtype=np.int64)

    def seal(self) -> None:
        """Bucket what fill left in memory by tile (read does it if not done; idempotent).

        Separate from fill because it takes a while (a copy of every held row) and calls no
        MPI: build_dict seals after the shared counter is closed, so another rank's last
        claim, which needs this rank inside MPI, does not wait for it.
        """
        if self._pending:
            self._held.update({tile: (rows[block], meta[block]) for tile, rows, meta, block in self._by_tile()})
        self._pending, self._pending_bytes = [], 0

    def _add(self, tiles, rows, meta) -> None:
        self._pending.append((tiles, rows, meta))
        self._pending_bytes += rows.nbytes + meta.nbytes
        if self._pending_bytes >= max(self.memory_bytes, SPILL_BATCH_BYTES):
            self._flush()

    def _by_tile(self):
        """(tile, rows, meta, row indices of that tile) over what is held, one group per tile."""
        if not self._pending:
            return
        tiles, rows, meta = (np.concatenate([p[i] for p in self._pending]) for i in range(3))
        self._pending = []
        order = np.argsort(tiles, kind="stable")
        present, starts = np.unique(tiles[order], return_index=True)
        for tile, block in zip(present.tolist(), np.split(order, starts[1:])):
            yield tile, rows, meta, block

    def _flush(self) -> None:
        for tile, rows, meta, block in self._by_tile():  # one append per tile, not per row
            with open(self._path(tile, "vec"), "ab") as f:
                rows[block].tofile(f)
            with open(self._path(tile, "meta"), "ab") as f:
                meta[block].tofile(f)
        self._pending_bytes = 0

    def _path(self, tile: int, kind: str) -> Path:
        return self.directory / f"tile-{int(tile):05d}.{kind}"

    def read(self, tile: int) -> tuple[np.ndarray, np.ndarray]:
        """(float32 rows [n, d], META records [n]) of one tile on this rank: its scratch file, then what memory holds."""
        self.seal()
        stored, metas = [], []
        if self._path(tile, "meta").is_file():
            stored.append(np.fromfile(self._path(tile, "vec"), dtype=self.STORAGE[self.dtype]).reshape(-1, self.d))
            metas.append(np.fromfile(self._path(tile, "meta"), dtype=self.META))
        if tile in self._held:
            rows, meta = self._held.pop(tile)  # each tile is read once: memory shrinks as tiles finish
            stored.append(rows)
            metas.append(meta)
        if not stored:
            return np.zeros((0, self.d), np.float32), np.zeros(0, self.META)
        join = (lambda parts: parts[0] if len(parts) == 1 else np.concatenate(parts))
        return shards.decode_hidden(join(stored), self.dtype), join(metas)

    def contexts(self, samples: np.ndarray, occurrences: np.ndarray) -> list[str]:
        """Marked example texts of (sample, occurrence) pairs."""
        texts = []
        with open(self.directory / "contexts.bin", "rb") as f:
            for sample, occurrence in zip(samples.tolist(), occurrences.tolist()):
                f.seek(int(self.doc_offsets[sample]))
                doc = json.loads(f.read(int(self.doc_offsets[sample + 1] - self.doc_offsets[sample])))
                texts.append(mark_occurrence(doc, occurrence))
        return texts

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
