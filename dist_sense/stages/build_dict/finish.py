"""Finishing clustered tiles for build_dict: example contexts and dictionary shards, in batches.

Each tile's clustering ends with every rank holding the same TileResult for the clustered
tokens. What is left: the senses of the tokens kept as their distinct vectors (most tokens
of a vocabulary have fewer vectors than k), the example contexts of each sense, and the
shard file. Done per tile, each step would be a collective during which the ranks not
writing that tile wait, and every rank would repeat the kept tokens' work. TileFinisher
holds finished tiles until they reach a memory budget (or the stage ends), then finishes
the batch: an alltoall sends each tile's kept rows to its writer (assign_writers), which
alone makes their senses; an allgather of the example candidates; an alltoall of
the winners' texts to the writers; then all ranks write their shards at once. A crash
loses at most the held batch, which a rerun rebuilds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dist_sense import kmeans
from dist_sense.formats.dictionary import SenseDictionary, shard_entry
from dist_sense.kmeans.mcl import MCL_MIN_VECTORS
from dist_sense.runtime import backend
from dist_sense.stages.build_dict.plan import tile_signature

if TYPE_CHECKING:
    from dist_sense.comm import LocalComm
    from dist_sense.stages.build_dict.spill import TileSpill

CANDIDATE = np.dtype([("tile", "<i8"), ("slot", "<i8"), ("label", "<i8"), ("distance", "<f4"),
                      ("priority", "<u8"), ("origin", "<i8"), ("occurrence", "<i4"), ("rank", "<i8"),
                      ("sample", "<i8")])
"""An example candidate: its tile and sense, its distance to it, its tie-breaks (priority, then
its identity: origin and occurrence, see TileSpill), and which rank holds its context (sample
and occurrence are that rank's spill references)."""

EXAMPLE_ORDER = ("tile", "slot", "label", "distance", "priority", "origin", "occurrence")
"""How candidates are ranked, most significant first: within a sense, nearest first, ties by
priority, then by identity. Every key is a property of the occurrence and its sense, never of
the rank that holds it nor of the order candidates arrive in, so any number of ranks picks the
same examples (the distances depend on the row and its centre alone: kmeans.assign_senses)."""


@dataclass
class FinishedTile:
    """A clustered tile waiting for its examples and its shard."""

    tile: int
    tokens: np.ndarray
    result: kmeans.TileResult
    """The same on every rank; per-row labels and distances already dropped. Senses of the
    tokens kept as vectors are added on the writer when the tile is finished."""
    candidates: np.ndarray
    """CANDIDATE records of this rank's rows nearest each clustered sense."""
    kept_rows: np.ndarray
    """CANDIDATE records (label -1) of this rank's rows of tokens kept as their distinct vectors."""
    kept_vectors: np.ndarray
    """float32 [len(kept_rows), d]: those rows' vectors, for the tile's writer."""

    @property
    def held_bytes(self) -> int:
        """What holding the tile costs, counted alike on every rank (the kept rows of all ranks)."""
        result = self.result
        kept = int(result.vectors_per_token[result.kept_as_vectors].sum())
        return result.centroids.nbytes + kept * (result.centroids.shape[1] * 4 + CANDIDATE.itemsize)


def finished_tile(tile: int, tokens: np.ndarray, local, result: kmeans.TileResult, meta: np.ndarray, rank: int,
                  limit: int, xp=np) -> FinishedTile:
    """This rank's `limit` nearest rows per sense as candidates, its rows of tokens kept as vectors, the result
    without its per-row arrays."""
    labels = backend.to_host(result.labels)

    def records(rows):
        out = np.zeros(len(rows), CANDIDATE)
        out["tile"], out["slot"], out["label"] = tile, local.slots[rows], labels[rows]
        out["priority"], out["origin"] = local.priority[rows], meta["origin"][rows]
        out["rank"], out["sample"], out["occurrence"] = rank, meta["sample"][rows], meta["occurrence"][rows]
        return out

    picked = kmeans.nearest_rows_per_sense(local, result, limit, ties=(meta["origin"], meta["occurrence"]))
    candidates = records(picked)
    candidates["distance"] = backend.to_host(result.distances)[picked]
    kept = np.flatnonzero(result.kept_as_vectors[local.slots] & (labels < 0))
    vectors = backend.to_host(local.vectors[backend.to_device(kept, xp)]).astype(np.float32, copy=False)
    result.labels = result.distances = None
    return FinishedTile(tile, tokens, result, candidates, records(kept), vectors)


class TileFinisher:
    """Holds finished tiles and finishes them in batches (see the module docstring).

    The budget counts what every rank counts alike (FinishedTile.held_bytes), so every rank
    flushes after the same tile and the batch's collectives match up. `on_senses(tile,
    senses per token)` runs on rank 0 for every finished tile (TensorBoard).
    """

    def __init__(self, comm: LocalComm, spill: TileSpill, out_dir: Path, settings: str, limit: int, budget_bytes: int,
                 on_senses=None):
        self.comm, self.spill, self.out_dir, self.settings = comm, spill, out_dir, settings
        self.limit, self.budget, self.on_senses = limit, budget_bytes, on_senses
        self.held: list[FinishedTile] = []
        self.held_bytes = 0
        self.written_bytes = np.zeros(comm.world, dtype=np.int64)  # per writer, over all flushes
        self.entries: dict[int, dict] = {}  # rank 0: index.json entry of every tile written, from its writer

    def add(self, done: FinishedTile) -> None:
        self.held.append(done)
        self.held_bytes += done.held_bytes
        if self.held_bytes >= self.budget:
            self.flush()

    def flush(self) -> None:
        """Add the kept tokens' senses on the writers, pick every held tile's examples over all ranks, read this
        rank's, route them to the writers, write."""
        if not self.held:
            return
        comm = self.comm
        self.held.sort(key=lambda held: held.tile)  # the same order on every rank: the exchanges below rely on it
        tiles = np.array([done.tile for done in self.held])
        writer = self.assign_writers()
        writes = [done for done, w in zip(self.held, writer) if w == comm.rank]
        # The rows of tokens kept as vectors go to their tile's writer, which alone makes those senses.
        outgoing = [[] for _ in range(comm.world)]
        for done, w in zip(self.held, writer):
            outgoing[w].append((done.kept_rows, done.kept_vectors))
        incoming = comm.alltoall(outgoing)
        kept_winners = []
        for i, done in enumerate(writes):
            rows = np.concatenate([parts[i][0] for parts in incoming])
            senses = kmeans.distinct_senses(rows["slot"], np.concatenate([parts[i][1] for parts in incoming]))
            rows["label"] = senses.row_sense
            done.result = kmeans.with_distinct_senses(done.result, senses)
            kept_winners.append(pick_examples(rows, self.limit))  # all at distance 0: the lowest priorities
        offered = comm.allgather(np.concatenate([done.candidates for done in self.held] + kept_winners))
        winners = pick_examples(offered, self.limit)
        own = winners[winners["rank"] == comm.rank]
        texts = self.spill.contexts(own["sample"], own["occurrence"])
        writer_of = writer[np.searchsorted(tiles, own["tile"])]
        incoming = comm.alltoall([[t for t, w in zip(texts, writer_of) if w == r] for r in range(comm.world)])
        mine = winners[writer[np.searchsorted(tiles, winners["tile"])] == comm.rank]
        sources = [iter(texts_from) for texts_from in incoming]
        written = []
        for done in writes:  # in tile order, as the texts arrive
            chosen = mine[mine["tile"] == done.tile]
            per_token = done.result.senses_per_token
            examples = examples_by_token(chosen, sources, done.tokens, per_token)
            write_tile(self.out_dir, done.tile, done.tokens, done.result, examples, self.settings)
            has_vectors = done.result.vectors_per_token > 0
            written.append((done.tile, per_token[has_vectors], shard_entry(self.out_dir, done.tile)))
        reports = comm.gather(written)  # rank 0 then needs to read no shard back for the index
        if comm.rank == 0:
            for tile, per_token, entry in sorted((r for part in reports for r in part), key=lambda r: r[0]):
                self.entries[tile] = entry
                if self.on_senses is not None:
                    self.on_senses(tile, per_token)
        self.held, self.held_bytes = [], 0

    def assign_writers(self) -> np.ndarray:
        """Writer rank of each held tile: largest first, each to the rank with the least written so far.

        Tiles differ a lot in size (frequent tokens cluster into many senses); tile % world
        would leave one rank writing the largest while the others wait at the end. Sizes are
        counted alike on every rank, so every rank assigns alike.
        """
        writer = np.zeros(len(self.held), dtype=np.int64)
        for i in sorted(range(len(self.held)), key=lambda i: (-self.held[i].held_bytes, self.held[i].tile)):
            writer[i] = int(np.argmin(self.written_bytes))
            self.written_bytes[writer[i]] += self.held[i].held_bytes
        return writer


def pick_examples(offered: np.ndarray, limit: int) -> np.ndarray:
    """The first `limit` candidates of each (tile, token, sense) over all ranks, in EXAMPLE_ORDER.

    Sorted by EXAMPLE_ORDER, so the result depends on the set of candidates, not on their order."""
    order = np.lexsort(tuple(offered[key] for key in reversed(EXAMPLE_ORDER)))
    ranked = offered[order]
    senses = int(ranked["label"].max(initial=0)) + 1
    group = (ranked["tile"] * (int(ranked["slot"].max(initial=0)) + 1) + ranked["slot"]) * senses + ranked["label"]
    return ranked[kmeans.rank_in_group(group) < limit]


def examples_by_token(winners: np.ndarray, sources: list, tokens: np.ndarray, senses_per_slot: np.ndarray) -> dict:
    """{token id: [[text, ...] per sense]}; each winner's text is the next one from its rank's iterator."""
    examples: dict = {}
    for slot, label, rank in zip(winners["slot"].tolist(), winners["label"].tolist(), winners["rank"].tolist()):
        senses = examples.setdefault(int(tokens[slot]), [[] for _ in range(senses_per_slot[slot])])
        senses[label].append(next(sources[rank]))
    return examples


def senses_histogram(senses_per_token: np.ndarray) -> dict:
    """{str(senses): tokens with that many}, for the index's senses-per-token distribution."""
    values, times = np.unique(np.asarray(senses_per_token, dtype=np.int64), return_counts=True)
    return {str(v): int(t) for v, t in zip(values.tolist(), times.tolist())}


def write_tile(out_dir: Path, tile: int, tokens: np.ndarray, result: kmeans.TileResult, examples: dict,
               settings: str) -> Path:
    per_token = result.vectors_per_token
    info = {
        "tile": tile, "settings": settings, "tile_range": tile_signature(tokens), "inertia": result.inertia,
        "iterations": len(result.history), "vectors": int(per_token.sum()),
        "kept_as_vectors": int(result.kept_as_vectors.sum()), "without_vectors": int((per_token == 0).sum()),
        "senses_histogram": senses_histogram(np.diff(result.offsets)),
    }
    if result.mcl_clusters is not None:
        info["left_out_of_mcl"] = int(((per_token > 0) & (per_token < MCL_MIN_VECTORS)).sum())
    tile_senses = SenseDictionary(tokens[result.slots], result.offsets, result.centroids, result.sense_counts,
                                  examples=examples)
    return tile_senses.save_shard(out_dir, tile, info)
