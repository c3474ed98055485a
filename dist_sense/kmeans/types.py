"""What the k-means steps hand each other: the collectives they need, one rank's tile, the run, the result.

Every step module imports these and these import no step, so the package's imports
form no circle. Nothing here knows about MPI: `Comm` is the interface the k-means needs,
met by dist_sense.comm's LocalComm and MpiComm (or a test's stand-in), and ONE_PROCESS
is a world of one, the default of a single process.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from dist_sense.kmeans.groups import rank_in_group


class Comm(Protocol):
    """The collectives of the k-means, on host numpy arrays; every rank calls each in the same order."""

    rank: int
    world: int

    def allreduce(self, array: np.ndarray) -> np.ndarray:
        """Element-wise sum over ranks."""

    def allgather(self, array: np.ndarray) -> np.ndarray:
        """Every rank's rows (any count per rank), concatenated in rank order."""


class OneProcess:
    """A world of one process: every collective is the identity."""

    rank, world = 0, 1

    def allreduce(self, array: np.ndarray) -> np.ndarray:
        return array

    def allgather(self, array: np.ndarray) -> np.ndarray:
        return array


ONE_PROCESS = OneProcess()
"""The Comm of plain single-process k-means."""


@dataclass
class LocalTile:
    """One rank's vectors of one tile, rows sorted by (token slot, priority)."""

    vectors: object
    """xp float32 [N, d] (unit rows for spherical k-means)."""
    slots: np.ndarray
    """int64 [N]: the row's token position in the tile, 0..n_tokens-1."""
    priority: np.ndarray
    """uint64 [N]: deterministic draw; each token's subsample is its lowest priorities over all ranks."""
    offsets: np.ndarray
    """int64 [n_tokens + 1]: rows of slot t are offsets[t]:offsets[t+1]."""
    sq_norms: object
    """xp float32 [N]: squared norms of the rows."""

    @property
    def n_tokens(self) -> int:
        return len(self.offsets) - 1


@dataclass
class TileRun:
    """What one tile's k-means runs with on this rank: its rows, settings, collectives and array module."""

    local: LocalTile
    cfg: object
    """A KMeansConfig."""
    comm: Comm
    xp: object
    """numpy or cupy: where the rows and the centres live."""
    seed: int = 0
    """The tile number: with cfg.seed, it seeds k-means++."""
    on_iteration: Callable[[dict], None] | None = None
    """Called with each Lloyd iteration's history record."""


@dataclass
class Centres:
    """The centres of the tokens being clustered, one row per token (run_lloyd updates them in place)."""

    points: object
    """xp float32 [B, K, d]."""
    valid: object
    """xp bool [B, K]: which of a row's K are senses (a token may have fewer than K)."""
    slots: np.ndarray
    """int64 [B]: the tile slot of each row."""
    iterations: np.ndarray | None = None
    """int64 [B]: the Lloyd iterations each row's token took part in (run_lloyd sets it)."""


@dataclass
class TileResult:
    """Senses of a tile's tokens in CSR layout (the layout of a dictionary shard), the same on every rank.

    Most tokens of a real vocabulary have fewer vectors than k; a dense [T, K, d] block
    per tile would be mostly padding, and moving it costs every rank alike.
    """

    slots: np.ndarray
    """int64 [U]: slots (positions in the tile) of the tokens that have senses, ascending."""
    offsets: np.ndarray
    """int64 [U + 1]: the senses of slots[i] are rows offsets[i]:offsets[i+1], most frequent first."""
    centroids: np.ndarray
    """float32 [S, d]."""
    sense_counts: np.ndarray
    """int64 [S]: vectors (over all ranks) nearest each sense."""
    vectors_per_token: np.ndarray
    """int64 [T]: vectors of each token over all ranks."""
    kept_as_vectors: np.ndarray
    """bool [T]: tokens with no more vectors than their k, whose senses are their distinct vectors
    (cluster_tile(keep_small=False) leaves their senses out: see with_distinct_senses)."""
    inertia: float
    """Sum over all ranks of squared distances to the nearest final sense."""
    history: list = field(default_factory=list)
    """Per Lloyd iteration: inertia, shift (summed squared centre movement) and reseeded senses."""
    labels: object = None
    """xp int64 [N]: this rank's rows' sense (within their token), in LocalTile row order; -1 where left out."""
    distances: object = None
    """xp float32 [N]: squared distance of each local row to its sense."""
    mcl_clusters: np.ndarray | None = None
    """int64 [T]: MCL clusters found per token (k_policy=mcl only)."""

    @property
    def n_tokens(self) -> int:
        return len(self.vectors_per_token)

    @property
    def senses_per_token(self) -> np.ndarray:
        """int64 [T]."""
        per_token = np.zeros(self.n_tokens, dtype=np.int64)
        per_token[self.slots] = np.diff(self.offsets)
        return per_token

    def dense(self):
        """(centres [T, K, d], valid [T, K], counts [T, K]) with K the most senses of a token: for inspection."""
        per_token = self.senses_per_token
        k_max = max(1, int(per_token.max(initial=0)))
        token = np.repeat(np.arange(self.n_tokens), per_token)
        sense = rank_in_group(token)
        centres = np.zeros((self.n_tokens, k_max, self.centroids.shape[1]), dtype=np.float32)
        valid = np.zeros((self.n_tokens, k_max), dtype=bool)
        counts = np.zeros((self.n_tokens, k_max), dtype=np.int64)
        centres[token, sense], valid[token, sense], counts[token, sense] = self.centroids, True, self.sense_counts
        return centres, valid, counts
