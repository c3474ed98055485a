"""Batched per-token k-means for one tile of tokens: the pure maths of build_dict.

Every token of a tile is its own clustering problem, and all of them run at once:
a rank's vectors are grouped by token into padded chunks so that assigning them is
one batched GEMM per chunk (kmeans_lloyd.py: the Lloyd iterations), k-means++ takes one
vectorised step per centre index (kmeans_start.py: the shared subsample, the start and
re-seeding), and MCL (mcl.py) runs on a padded stack of affinity matrices. This module
holds a tile's data, its result and the steps that tie those together. Arrays live on `xp` (cupy or numpy). Nothing here
knows about MPI: callers pass `allreduce(array) -> array` (sum over ranks) and
`allgather(array) -> array` (every rank's rows, in rank order), both on host numpy
arrays; with the identity for both this is plain single-process k-means.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from dist_sense.kmeans.lloyd import Collective, assign_senses, final_assignment, lloyd_stats, plan_chunks, run_lloyd  # noqa: F401
from dist_sense.kmeans.mcl import mcl_cluster_counts, senses_from_mcl
from dist_sense.kmeans.start import (  # noqa: F401
    DistinctSenses,
    GroupSubsample,
    Subsample,
    distinct_senses,
    gather_rows,
    gather_subsample,
    kmeans_plusplus,
    plusplus_job,
    rank_in_group,
    reseed_empty,
    senses_of_rows,
    share_tokens,
    size_classes,
)
from dist_sense.runtime.backend import to_device, to_host


def identity(array):
    """The collective of a world of one process."""
    return array


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
class TileResult:
    """Senses of a tile's tokens in CSR layout (the layout of a dictionary shard), the same on every rank.

    Most tokens of a real vocabulary have fewer vectors than k; a dense [T, K, d] block
    per tile would be mostly padding (5x the senses on the demo corpus), and moving it
    costs every rank alike.
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

    centres = property(lambda self: self.dense()[0])
    valid = property(lambda self: self.dense()[1])
    counts = property(lambda self: self.dense()[2])


def make_local_tile(vectors: np.ndarray, slots, priority, n_tokens: int, xp, spherical: bool = False):
    """Sort a rank's rows by (slot, priority) onto `xp`; returns (LocalTile, the row order applied)."""
    slots = np.asarray(slots, dtype=np.int64)
    priority = np.asarray(priority, dtype=np.uint64)
    order = np.lexsort((priority, slots))
    rows = to_device(np.ascontiguousarray(np.asarray(vectors, dtype=np.float32)[order]), xp)
    if spherical:
        rows = rows / xp.maximum(xp.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    offsets = np.zeros(n_tokens + 1, dtype=np.int64)
    np.cumsum(np.bincount(slots, minlength=n_tokens), out=offsets[1:])
    sq_norms = xp.einsum("ij,ij->i", rows, rows)  # no [N, d] temporary
    tile = LocalTile(rows, slots[order], priority[order], offsets, sq_norms)
    return tile, order


def order_senses(centres, valid, counts: np.ndarray, labels, row_slots: np.ndarray, token_slots: np.ndarray, xp):
    """Most frequent sense first, senses no vector is nearest to dropped; labels follow.

    centres/valid/counts are per centre row, row i for slot token_slots[i]; row_slots is
    the slot of each local row (LocalTile.slots). Returns the
    senses grouped by slot, ascending, as (slot of each sense [S], centroids [S, d] on the
    host, counts [S]) and the local rows' labels renumbered (-1 stays -1). Only the kept
    senses are copied, once.
    """
    token_slots = np.asarray(token_slots, dtype=np.int64)
    valid = to_host(valid) & (counts > 0)
    perm = np.argsort(-np.where(valid, counts, -1), axis=1, kind="stable")
    inverse = np.argsort(perm, axis=1, kind="stable")
    kept = valid.sum(axis=1)
    row = np.repeat(np.arange(len(kept)), kept)
    row = row[np.argsort(token_slots[row], kind="stable")]  # by slot; each row's senses stay together, in order
    source = perm[row, rank_in_group(row)]
    centroids = to_host(centres[to_device(row, xp), to_device(source, xp)])
    position = np.full(int(token_slots.max(initial=-1)) + 1, -1, dtype=np.int64)
    position[token_slots] = np.arange(len(token_slots))
    labelled = xp.flatnonzero(labels >= 0)
    if len(labelled):
        host_rows = to_host(labelled)
        row_of = to_device(position[row_slots[host_rows]], xp)
        labels[labelled] = to_device(inverse, xp)[row_of, labels[labelled]]
    return token_slots[row], centroids, counts[row, source], labels


def csr_senses(sense_slots: np.ndarray, centroids: np.ndarray, counts: np.ndarray):
    """(slots, offsets, centroids, counts) of senses given per sense; a stable sort by slot keeps each token's order."""
    sense_slots = np.asarray(sense_slots, dtype=np.int64)
    if len(sense_slots) > 1 and (np.diff(sense_slots) < 0).any():
        order = np.argsort(sense_slots, kind="stable")
        sense_slots, centroids, counts = sense_slots[order], centroids[order], counts[order]
    slots, per_slot = np.unique(sense_slots, return_counts=True)
    offsets = np.zeros(len(slots) + 1, dtype=np.int64)
    np.cumsum(per_slot, out=offsets[1:])
    return slots, offsets, np.asarray(centroids, dtype=np.float32), np.asarray(counts, dtype=np.int64)


def with_distinct_senses(result: TileResult, senses: DistinctSenses) -> TileResult:
    """`result` plus the senses of its tokens kept as their distinct vectors."""
    slot_of_sense = np.concatenate([np.repeat(result.slots, np.diff(result.offsets)), senses.slots])
    slots, offsets, centroids, counts = csr_senses(slot_of_sense, np.concatenate([result.centroids, senses.points]),
                                                   np.concatenate([result.sense_counts, senses.counts]))
    return replace(result, slots=slots, offsets=offsets, centroids=centroids, sense_counts=counts)


# ----------------------------------------------------------------------------- one tile


def cluster_tile(local: LocalTile, cfg, allreduce: Collective = identity, allgather: Collective = identity, xp=np,
                 seed: int = 0, k=None, on_iteration=None, share: tuple[int, int] = (0, 1),
                 keep_small: bool = True) -> TileResult:
    """Senses of every token of a tile: choose k, seed, iterate, count. Same result on every rank.

    `cfg` is a KMeansConfig; `seed` (the tile number) and cfg.seed seed k-means++;
    `k` (int or [T]) overrides the k policy (for tests and experiments). `share` is
    (rank, world): each rank seeds its share of the tokens (see kmeans_start.share_tokens);
    (0, 1), or the same on every rank, does all of it everywhere. With keep_small=False
    the tokens with no more vectors than their k are only marked (kept_as_vectors): their
    vectors are not gathered, their rows keep label -1, and whoever holds all of them
    adds their senses (build_dict does it on the tile's writer: with_distinct_senses).
    """
    n_tokens, d = local.n_tokens, int(local.vectors.shape[1])
    per_token = allreduce(np.bincount(local.slots, minlength=n_tokens).astype(np.int64))
    cap = np.minimum(per_token, cfg.subsample)
    clusters = None
    if k is None and cfg.k_policy == "fixed":
        k = cfg.k
    if k is None:
        sub = gather_subsample(local, np.minimum(per_token, max(cfg.subsample, 5)), allgather, xp)
        clusters = mcl_cluster_counts(sub, cfg.mcl_expansion, cfg.mcl_inflation, cfg.mcl_iters, xp)
        k = senses_from_mcl(clusters)
        del sub
    k = np.where(per_token > 0, np.broadcast_to(np.asarray(k, dtype=np.int64), (n_tokens,)), 0)
    small = (per_token > 0) & (per_token <= k)
    big = np.flatnonzero(per_token > k)
    keep_here = keep_small and bool(small.any())
    senses = (np.zeros(0, np.int64), np.zeros((0, d), np.float32), np.zeros(0, np.int64))  # (slot, centroid, count)
    labels, distances = xp.full(len(local.slots), -1, dtype=xp.int64), xp.zeros(len(local.slots), dtype=xp.float32)
    inertia, history, small_senses = 0.0, [], None
    if len(big) or keep_here:  # decided from allreduced counts, so every rank skips the collectives alike
        # One subsample gather for the tile: the clustered tokens send max(their subsample, k)
        # vectors, small tokens (if kept here) all of theirs. Every size group is cut from it locally.
        cap = np.where(per_token > k, np.maximum(cap, k), 0)
        rows = gather_rows(local, np.where(small, per_token, cap) if keep_small else cap, allgather, xp)
        if keep_here:
            wanted = small[rows.slots]
            small_senses = distinct_senses(rows.slots[wanted], rows.take(wanted))
        if len(big):
            senses, labels, distances, inertia, history = _cluster_tokens(
                local, rows, big, k, per_token, cfg, allreduce, allgather, xp, seed, on_iteration, share)
    result = TileResult(*csr_senses(*senses), per_token, small, inertia, history, labels, distances, clusters)
    if small_senses is not None:
        result = with_distinct_senses(result, small_senses)
        mine = np.flatnonzero(small[local.slots])
        found = senses_of_rows(small_senses, local.slots[mine], to_host(local.vectors[to_device(mine, xp)]))
        result.labels[to_device(mine, xp)] = to_device(found, xp)
    return result


def _cluster_tokens(local, rows, big, k, per_token, cfg, allreduce, allgather, xp, seed, on_iteration, share):
    """k-means++ then Lloyd for the tokens `big` (slots) of a tile, from the gathered subsample `rows`.

    Returns ((slot, centroid, count) per sense, labels, distances, inertia, history).
    """
    d = int(local.vectors.shape[1])
    groups, jobs, order, first = [], [], [], 0
    rng = np.random.default_rng([cfg.seed, seed])
    gathered = np.bincount(rows.slots, minlength=local.n_tokens)
    for members in size_classes(np.maximum(np.minimum(per_token[big], cfg.subsample), k[big])):
        slots = big[members]
        sub = GroupSubsample(rows, slots, max(1, int(gathered[slots].max())), xp)  # padded as needed
        jobs.append(plusplus_job(sub, k[slots], rng, xp))
        groups.append((sub, first, first + len(slots)))
        order.append(slots)
        first += len(slots)
    # k-means++ for every size group, each rank its share of the tokens, one allgather.
    seeded = share_tokens(jobs, share, allgather, xp)
    k_max = max(c.shape[1] for c, _ in seeded)
    centres = xp.concatenate([xp.pad(c, ((0, 0), (0, k_max - c.shape[1]), (0, 0))) for c, _ in seeded])
    valid = xp.concatenate([xp.pad(v, ((0, 0), (0, k_max - v.shape[1]))) for _, v in seeded])
    order = np.concatenate(order)
    chunks = plan_chunks(local.offsets, d, xp, tokens=order)
    centres, valid, history = run_lloyd(local, chunks, groups, centres, valid, allreduce, xp, cfg, on_iteration, order)
    labels, distances, counts, inertia = final_assignment(local, chunks, centres, valid, allreduce, xp, order)
    sense_slots, centroids, sense_counts, labels = order_senses(centres, valid, counts, labels, local.slots, order, xp)
    return (sense_slots, centroids, sense_counts), labels, distances, inertia, history


def nearest_rows_per_sense(local: LocalTile, result: TileResult, limit: int) -> np.ndarray:
    """Local rows closest to their sense, at most `limit` per sense (example contexts)."""
    labels, distances = to_host(result.labels), to_host(result.distances)
    labelled = np.flatnonzero(labels >= 0)  # rows left to another rank's finishing (keep_small=False) are not
    keys = (local.priority[labelled], distances[labelled], labels[labelled], local.slots[labelled])
    order = labelled[np.lexsort(keys)]
    group = local.slots[order] * (int(labels.max(initial=0)) + 1) + labels[order]
    return order[rank_in_group(group) < limit]
