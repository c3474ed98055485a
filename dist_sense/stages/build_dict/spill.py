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

from dist_sense.formats import shards

SPILL_BATCH_BYTES = 64 << 20
"""Spilled rows go to the scratch files in batches of at least this much (one append per tile a batch)."""
BLOCK_BYTES = 8 << 20
"""Held rows are merged into blocks of about this much, indexed by tile when reading ends."""

if TYPE_CHECKING:
    from dist_sense.stages.build_dict.plan import TilePlan

CONTEXT_CHARS = 160
"""Characters of window text kept on each side of an example occurrence."""


def work_units(shard_samples: list[tuple[str, int]], unit: int, tail_samples: int = 0,
               tail_unit: int | None = None) -> list[tuple[str, int, int]]:
    """The reading split into (file, first sample, end sample) runs of at most `unit` samples, files in name order.

    Ranks claim these one at a time from a shared counter (build_dict), so a rank slowed by
    its data or its core just claims fewer: every rank must finish reading before the first
    tile's collective, and fixed shares left the others waiting for the slowest. The last
    `tail_samples` samples come in units of `tail_unit`, so the ranks' last claims are short
    and they finish closer together. Which rank reads a sample changes neither the subsample
    nor the ranking of example contexts (see occurrence_priority).
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
    dtype; beside each row go its token, its subsample priority, its origin (shard number
    << 32 | sample number in that shard: with the occurrence, an identity that is the same
    on any rank, the last tie-break between example candidates) and where its context is
    (a sample number into contexts.bin and the occurrence's index in that sample).
    Rows stay in memory up to `memory_bytes` (at least SPILL_BATCH_BYTES); past that, what
    is held is appended to per-tile scratch files and memory starts over, so memory stays bounded whatever the
    corpus, and a corpus that fits costs no scratch I/O (which, written and read back,
    took system time from both ranks of a 2-core run).
    """

    META = np.dtype([("token", "<i8"), ("priority", "<u8"), ("origin", "<i8"), ("sample", "<i8"),
                     ("occurrence", "<i4")])
    STORAGE = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16}

    def __init__(self, directory: Path, dtype: str, d: int, memory_bytes: int = 512 << 20):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        self.directory, self.dtype, self.d, self.memory_bytes = directory, dtype, d, memory_bytes
        self.doc_offsets = [0]
        self._pending: list = []  # per sample (tiles, rows, meta), merged into a block every BLOCK_BYTES
        self._pending_bytes = 0
        self._blocks: list = []  # (tiles, rows, meta) of many samples each
        self._blocks_bytes = 0
        self._held: dict[int, list] = {}  # after seal: tile -> [(rows, meta, indices) per block]
        self.counted = {"samples": 0, "vectors": 0}  # what fill read, kept or not: checked against the manifest

    def fill(self, units: Iterable[tuple[Path, int, int]], plan: TilePlan, todo: list[int], seed: int,
             poll: Callable[[], object] = lambda: None, shard_numbers: dict[str, int] | None = None) -> None:
        """Read (shard, first sample, end sample) units, as claimed, into the tile files of `todo`.

        `poll` runs after every sample (build_dict.SharedCounter.poll: lets MPI serve the other
        ranks' claims). `shard_numbers` (file name -> number, the same on every rank) makes the
        rows' origins; without it, shards are numbered as they come."""
        tile_map = np.where(np.isin(plan.tile_of_token, todo), plan.tile_of_token, -1)
        numbers = {} if shard_numbers is None else shard_numbers
        offsets: dict[Path, list[int]] = {}  # per shard, so a unit starts at its first sample's header
        with open(self.directory / "contexts.bin", "wb") as contexts:
            for path, start, stop in units:
                if start > 0 and path not in offsets:
                    offsets[path] = shards.sample_offsets(path)
                first = numbers.setdefault(path.name, len(numbers)) << 32 | start
                samples = shards.iter_hidden_range(path, start, stop, self.dtype, offsets.get(path))
                for origin, sample in enumerate(samples, first):
                    poll()
                    tokens = sample["tokens"]
                    self.counted["samples"] += 1
                    self.counted["vectors"] += len(tokens)
                    inside = (tokens >= 0) & (tokens < len(tile_map))
                    tiles = np.where(inside, tile_map[np.where(inside, tokens, 0)], -1)
                    keep = np.flatnonzero(tiles >= 0)
                    if len(keep) == 0:
                        continue
                    doc = json.dumps(sample["doc"]).encode()
                    contexts.write(doc)
                    self.doc_offsets.append(self.doc_offsets[-1] + len(doc))
                    meta = np.zeros(len(keep), self.META)
                    meta["token"], meta["origin"] = tokens[keep], origin
                    meta["sample"], meta["occurrence"] = len(self.doc_offsets) - 2, keep
                    meta["priority"] = occurrence_priority(seed, path.name, sample["key"], sample["pos"][keep])
                    self._add(tiles[keep], shards.encode_hidden(sample["hidden"][keep], self.dtype), meta)
        self.doc_offsets = np.asarray(self.doc_offsets, dtype=np.int64)

    def seal(self) -> None:
        """Index what fill left in memory by tile (read does it if not done; idempotent).

        Separate from fill, although it only sorts tile numbers (no rows are copied), because
        it calls no MPI: build_dict seals after the shared counter is closed, so another
        rank's last claim, which needs this rank inside MPI, never waits for it.
        """
        self._merge()
        for tile, pieces in self._by_tile().items():
            self._held.setdefault(tile, []).extend(pieces)
        self._blocks, self._blocks_bytes = [], 0

    def _add(self, tiles, rows, meta) -> None:
        self._pending.append((tiles, rows, meta))
        self._pending_bytes += rows.nbytes + meta.nbytes
        if self._pending_bytes + self._blocks_bytes >= max(self.memory_bytes, SPILL_BATCH_BYTES):
            self._merge()
            self._flush()
        elif self._pending_bytes >= BLOCK_BYTES:
            self._merge()

    def _merge(self) -> None:
        """One block of the pending samples' rows (a sample's rows alone are too small to index one by one)."""
        if not self._pending:
            return
        self._blocks.append(tuple(np.concatenate([p[i] for p in self._pending]) for i in range(3)))
        self._blocks_bytes += self._pending_bytes
        self._pending, self._pending_bytes = [], 0

    def _by_tile(self) -> dict[int, list]:
        """tile -> [(rows, meta, indices of that tile's rows) per block] over the blocks."""
        pieces: dict[int, list] = {}
        for tiles, rows, meta in self._blocks:
            order = np.argsort(tiles, kind="stable")
            present, starts = np.unique(tiles[order], return_index=True)
            for tile, block in zip(present.tolist(), np.split(order, starts[1:])):
                pieces.setdefault(tile, []).append((rows, meta, block))
        return pieces

    def _flush(self) -> None:
        for tile, pieces in self._by_tile().items():  # one append per tile and block, not per row
            with open(self._path(tile, "vec"), "ab") as f:
                for rows, _, block in pieces:
                    rows[block].tofile(f)
            with open(self._path(tile, "meta"), "ab") as f:
                for _, meta, block in pieces:
                    meta[block].tofile(f)
        self._blocks, self._blocks_bytes = [], 0

    def _path(self, tile: int, kind: str) -> Path:
        return self.directory / f"tile-{int(tile):05d}.{kind}"

    def read(self, tile: int) -> tuple[np.ndarray, np.ndarray]:
        """(float32 rows [n, d], META records [n]) of one tile on this rank: its scratch file, then what memory holds."""
        self.seal()
        stored, metas = [], []
        if self._path(tile, "meta").is_file():
            stored.append(np.fromfile(self._path(tile, "vec"), dtype=self.STORAGE[self.dtype]).reshape(-1, self.d))
            metas.append(np.fromfile(self._path(tile, "meta"), dtype=self.META))
        pieces = self._held.pop(tile, [])  # each tile is read once; a block is freed once all its tiles are
        n = sum(len(p) for p in stored) + sum(len(block) for _, _, block in pieces)
        rows = np.empty((n, self.d), self.STORAGE[self.dtype])
        meta = np.empty(n, self.META)
        at = 0
        for part, part_meta in zip(stored, metas):
            rows[at : at + len(part)], meta[at : at + len(part)] = part, part_meta
            at += len(part)
        for block_rows, block_meta, block in pieces:  # gathered straight into place: one copy
            np.take(block_rows, block, axis=0, out=rows[at : at + len(block)])
            np.take(block_meta, block, out=meta[at : at + len(block)])
            at += len(block)
        return shards.decode_hidden(rows, self.dtype), meta

    def contexts(self, samples: np.ndarray, occurrences: np.ndarray) -> list[str]:
        """Marked example texts of (sample, occurrence) pairs; each sample's text is read and parsed once."""
        samples = np.asarray(samples, dtype=np.int64)
        texts = [""] * len(samples)
        order = np.argsort(samples, kind="stable")
        with open(self.directory / "contexts.bin", "rb") as f:
            current, doc = -1, None
            for i, sample, occurrence in zip(order.tolist(), samples[order].tolist(),
                                             np.asarray(occurrences)[order].tolist()):
                if sample != current:
                    f.seek(int(self.doc_offsets[sample]))
                    doc = json.loads(f.read(int(self.doc_offsets[sample + 1] - self.doc_offsets[sample])))
                    current = sample
                texts[i] = mark_occurrence(doc, occurrence)
        return texts

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
