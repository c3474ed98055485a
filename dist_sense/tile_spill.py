"""A rank's hidden rows bucketed by tile in scratch files, for build_dict.

Which shards a rank reads (assign_shards), the subsample priority of each occurrence
(the same on any rank), and the scratch files that let each tile be read back alone,
with the example context of every row.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import shards

if TYPE_CHECKING:
    from .build_dict import TilePlan

SPILL_FLUSH_BYTES = 64 << 20
"""Rows buffered in memory before they are appended to the per-tile scratch files."""
CONTEXT_CHARS = 160
"""Characters of window text kept on each side of an example occurrence."""


def assign_shards(files: list[str], sizes: list[int], world: int) -> list[list[str]]:
    """Shards per rank, balanced by bytes: largest first, each to the least-loaded rank.

    Every rank reads its shards before the first tile's collective, so the most loaded
    rank sets when all of them start; a rank's last shard is often short, which plain
    round-robin ignores. Deterministic: ties go to the lower rank, files in name order.
    """
    loads, shares = [0] * world, [[] for _ in range(world)]
    for size, name in sorted(zip(sizes, files), key=lambda pair: (-pair[0], pair[1])):
        rank = loads.index(min(loads))
        loads[rank] += size
        shares[rank].append(name)
    return [sorted(share) for share in shares]


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
    """This rank's hidden rows bucketed by tile in scratch files, so each tile is read back alone.

    One pass over the rank's shards replaces one pass per tile. Rows keep their storage
    dtype; beside each row go its token, its subsample priority and where its context
    is (a sample number into contexts.bin and the occurrence's index in that sample).
    """

    META = np.dtype([("token", "<i8"), ("priority", "<u8"), ("sample", "<i8"), ("occurrence", "<i4")])
    STORAGE = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16}

    def __init__(self, directory: Path, dtype: str, d: int):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        self.directory, self.dtype, self.d = directory, dtype, d
        self.doc_offsets = [0]
        self._pending: list = []
        self._pending_bytes = 0

    def fill(self, paths: list[Path], plan: TilePlan, todo: list[int], seed: int) -> None:
        tile_map = np.where(np.isin(plan.tile_of_token, todo), plan.tile_of_token, -1)
        with open(self.directory / "contexts.bin", "wb") as contexts:
            for path in paths:
                for sample in shards.iter_hidden([path], self.dtype):
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
        self._flush()
        self.doc_offsets = np.asarray(self.doc_offsets, dtype=np.int64)

    def _add(self, tiles, rows, meta) -> None:
        self._pending.append((tiles, rows, meta))
        self._pending_bytes += rows.nbytes + meta.nbytes
        if self._pending_bytes >= SPILL_FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        tiles, rows, meta = (np.concatenate([p[i] for p in self._pending]) for i in range(3))
        order = np.argsort(tiles, kind="stable")
        present, starts = np.unique(tiles[order], return_index=True)
        for tile, block in zip(present, np.split(order, starts[1:])):  # one append per tile, not per row
            with open(self._path(tile, "vec"), "ab") as f:
                rows[block].tofile(f)
            with open(self._path(tile, "meta"), "ab") as f:
                meta[block].tofile(f)
        self._pending, self._pending_bytes = [], 0

    def _path(self, tile: int, kind: str) -> Path:
        return self.directory / f"tile-{int(tile):05d}.{kind}"

    def read(self, tile: int) -> tuple[np.ndarray, np.ndarray]:
        """(float32 rows [n, d], META records [n]) of one tile on this rank."""
        if not self._path(tile, "meta").is_file():
            return np.zeros((0, self.d), np.float32), np.zeros(0, self.META)
        stored = np.fromfile(self._path(tile, "vec"), dtype=self.STORAGE[self.dtype]).reshape(-1, self.d)
        return shards.decode_hidden(stored, self.dtype), np.fromfile(self._path(tile, "meta"), dtype=self.META)

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
