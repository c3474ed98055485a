"""Finishing clustered tiles for build_dict: example contexts and dictionary shards, in batches.

Each tile's clustering ends with every rank holding the same TileResult. What is left, the
example contexts of each sense and the shard file, used to run per tile: a collective
to pick the examples, a gather of their texts to the tile's writer, the writer's write,
during which every other rank waited at the next tile's first collective. TileFinisher
holds finished tiles until their results reach a memory budget (or the stage ends) and
then finishes the whole batch with two collectives; the ranks then write their shards at
the same time. A crash loses at most the held batch, which a rerun rebuilds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import backend, kmeans
from .dictionary import SenseDictionary

if TYPE_CHECKING:
    from .build_dict import Collectives
    from .tile_spill import TileSpill

CANDIDATE = np.dtype([("tile", "<i8"), ("slot", "<i8"), ("label", "<i8"), ("distance", "<f4"),
                      ("priority", "<u8"), ("rank", "<i8"), ("sample", "<i8"), ("occurrence", "<i4")])
"""An example candidate: its tile and sense, its distance to it, its tie-break, and which
rank holds its context (sample and occurrence are that rank's spill references)."""


@dataclass
class FinishedTile:
    """A clustered tile waiting for its examples and its shard."""

    tile: int
    tokens: np.ndarray
    result: kmeans.TileResult
    """The same on every rank; per-row labels and distances already dropped."""
    candidates: np.ndarray
    """CANDIDATE records of this rank's rows nearest each sense."""


def finished_tile(tile: int, tokens: np.ndarray, local, result: kmeans.TileResult, meta: np.ndarray, rank: int,
                  limit: int) -> FinishedTile:
    """Keep this rank's `limit` nearest rows per sense as candidates, and the result without its per-row arrays."""
    picked = kmeans.nearest_rows_per_sense(local, result, limit)
    mine = np.zeros(len(picked), CANDIDATE)
    mine["tile"], mine["slot"], mine["label"] = tile, local.slots[picked], backend.to_host(result.labels)[picked]
    mine["distance"], mine["priority"] = backend.to_host(result.distances)[picked], local.priority[picked]
    mine["rank"], mine["sample"], mine["occurrence"] = rank, meta["sample"][picked], meta["occurrence"][picked]
    result.labels = result.distances = None
    return FinishedTile(tile, tokens, result, mine)


class TileFinisher:
    """Holds finished tiles and finishes them in batches (see the module docstring).

    The budget counts the results' centre arrays, which are the same on every rank, so
    every rank flushes after the same tile and the batch's collectives match up.
    """

    def __init__(self, comm: Collectives, spill: TileSpill, out_dir: Path, settings: str, limit: int, budget_bytes: int):
        self.comm, self.spill, self.out_dir, self.settings = comm, spill, out_dir, settings
        self.limit, self.budget = limit, budget_bytes
        self.held: list[FinishedTile] = []
        self.held_bytes = 0

    def add(self, done: FinishedTile) -> None:
        self.held.append(done)
        self.held_bytes += done.result.centres.nbytes
        if self.held_bytes >= self.budget:
            self.flush()

    def flush(self) -> None:
        """Pick every held tile's examples over all ranks, read this rank's, route them to the writers, write."""
        if not self.held:
            return
        comm = self.comm
        offered = comm.allgather(np.concatenate([done.candidates for done in self.held]))
        winners = pick_examples(offered, max(int(d.result.valid.shape[1]) for d in self.held), self.limit)
        own = winners[winners["rank"] == comm.rank]
        texts = self.spill.contexts(own["sample"], own["occurrence"])
        writer_of = own["tile"] % comm.world
        incoming = comm.alltoall([[t for t, w in zip(texts, writer_of) if w == r] for r in range(comm.world)])
        mine = winners[winners["tile"] % comm.world == comm.rank]
        sources = [iter(texts_from) for texts_from in incoming]
        for done in sorted(self.held, key=lambda held: held.tile):  # the texts arrive in tile order
            if done.tile % comm.world != comm.rank:
                continue
            chosen = mine[mine["tile"] == done.tile]
            examples = examples_by_token(chosen, sources, done.tokens, done.result.valid.sum(axis=1))
            write_tile(self.out_dir, done.tile, done.tokens, done.result, examples, self.settings)
        self.held, self.held_bytes = [], 0


def pick_examples(offered: np.ndarray, k_max: int, limit: int) -> np.ndarray:
    """The `limit` nearest candidates of each (tile, token, sense) over all ranks, sorted by (tile, slot, label, distance, priority)."""
    order = np.lexsort((offered["priority"], offered["distance"], offered["label"], offered["slot"], offered["tile"]))
    ranked = offered[order]
    group = (ranked["tile"] * (int(ranked["slot"].max(initial=0)) + 1) + ranked["slot"]) * (k_max + 1) + ranked["label"]
    return ranked[kmeans.rank_in_group(group) < limit]


def examples_by_token(winners: np.ndarray, sources: list, tokens: np.ndarray, senses_per_slot: np.ndarray) -> dict:
    """{token id: [[text, ...] per sense]}; each winner's text is the next one from its rank's iterator."""
    examples: dict = {}
    for slot, label, rank in zip(winners["slot"].tolist(), winners["label"].tolist(), winners["rank"].tolist()):
        senses = examples.setdefault(int(tokens[slot]), [[] for _ in range(senses_per_slot[slot])])
        senses[label].append(next(sources[rank]))
    return examples


def tile_signature(tokens: np.ndarray) -> list:
    return [int(tokens[0]), int(tokens[-1]), int(len(tokens))]


def write_tile(out_dir: Path, tile: int, tokens: np.ndarray, result: kmeans.TileResult, examples: dict,
               settings: str) -> Path:
    slots, offsets, centroids, counts = kmeans.tile_csr(result)
    per_token = result.vectors_per_token
    info = {
        "tile": tile, "settings": settings, "tile_range": tile_signature(tokens), "inertia": result.inertia,
        "iterations": len(result.history), "vectors": int(per_token.sum()),
        "kept_as_vectors": int(result.kept_as_vectors.sum()), "without_vectors": int((per_token == 0).sum()),
    }
    tile_senses = SenseDictionary(tokens[slots], offsets, centroids.astype(np.float32), counts, examples=examples)
    return tile_senses.save_shard(out_dir, tile, info)
