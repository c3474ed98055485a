"""How many senses a token gets under k_policy=mcl: Markov clustering, batched over tokens.

The paper's rule runs MCL (expansion 2, inflation 1.65, up to 100 iterations) on each
token's affinities 1/(euclidean + 0.01) over every sampled vector of the token (up to
kmeans.mcl_vectors, the reference's 1000) and takes a fraction of the clusters found.
Here the tokens of a tile run at once, grouped by vector count and padded within a
group, on stacks of affinity matrices (one batched matmul per expansion step), not a
library call per token; each rank clusters its share of the tokens (start.share_tokens)
and the counts are all-gathered. A token stops iterating when its own flow has
converged, so its count does not depend on which tokens it was batched with, nor on the
number of ranks. Tokens with fewer than MCL_MIN_VECTORS vectors are left out (and
counted): they keep their vectors as senses anyway.
"""
from __future__ import annotations

import numpy as np

from dist_sense.runtime.backend import to_device, to_host

CHUNK_ELEMENTS = 1 << 25
"""Floats in one padded stack of affinity matrices (bounds memory)."""
MCL_MIN_VECTORS = 5
"""Tokens with fewer vectors are left out of MCL (the reference's minimum; k is at least 5 anyway)."""
MCL_PAD_RATIO = 2 ** 0.125
"""MCL groups tokens whose vector counts differ by under this factor: its cost is cubic in the padded width."""
MCL_PRUNE = 1e-3
"""MCL flows below this are cut to zero (each column keeps its largest entry)."""


def senses_from_mcl(n_clusters) -> np.ndarray:
    """The paper's rule: int(0.1 n) senses, int(0.4 n) above 900 clusters, at least 5."""
    n = np.asarray(n_clusters, dtype=np.int64)
    k = np.where(n > 900, (0.4 * n).astype(np.int64), (0.1 * n).astype(np.int64))
    return np.maximum(k, 5)


def mcl_cluster_counts(sub, expansion: int, inflation: float, max_iter: int, xp) -> np.ndarray:
    """Markov clusters of each token's subsample on affinities 1/(euclidean + 0.01), batched."""
    n_tokens, width, _ = sub.points.shape
    per_chunk = max(1, CHUNK_ELEMENTS // (width * width))
    counts = [
        _mcl_chunk(sub.points[s : s + per_chunk], sub.mask[s : s + per_chunk], expansion, inflation, max_iter, xp)
        for s in range(0, n_tokens, per_chunk)
    ]
    return np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)


def _normalise_columns(flow, xp):
    total = flow.sum(axis=1, keepdims=True)
    return flow / xp.where(total > 0, total, 1)


def _mcl_chunk(points, mask, expansion: int, inflation: float, max_iter: int, xp) -> np.ndarray:
    width = points.shape[1]
    sq = (points * points).sum(-1)
    dist = xp.sqrt(xp.maximum(sq[:, :, None] + sq[:, None, :] - 2 * (points @ points.transpose(0, 2, 1)), 0))
    # Self-loops weigh 1, as markov_clustering's run_mcl (the reference) sets its diagonal.
    eye = xp.eye(width, dtype=bool)
    pair = mask[:, :, None] & mask[:, None, :]
    affinity = xp.where(eye, 1.0, 1.0 / (dist + 0.01))
    final = _normalise_columns(xp.where(pair, affinity, 0).astype(xp.float32), xp)
    # Only the tokens still moving are iterated: a converged token leaves the batch with its flow.
    moving, flow = xp.arange(len(points)), final
    for _ in range(max_iter):
        previous = flow
        for _ in range(expansion - 1):
            flow = flow @ previous
        flow = _normalise_columns(flow**inflation, xp)
        flow *= (flow >= MCL_PRUNE) | (flow == flow.max(axis=1, keepdims=True))
        still = ~(xp.abs(flow - previous) <= 1e-8 + 1e-5 * xp.abs(previous)).all(axis=(1, 2))
        final[moving] = flow  # after the test: `previous` may be a view of `final`
        if not bool(still.any()):
            break
        moving, flow = moving[still], flow[still]
    flow = final
    # A cluster is the support of an attractor's row; attractors of one cluster share it.
    # Supports are compared by an exact integer signature (random weights < 2^40, sums < 2^53).
    attractor = (xp.diagonal(flow, axis1=1, axis2=2) > 0) & mask
    weights = to_device(np.random.default_rng(12345).integers(1, 1 << 40, width).astype(np.float64), xp)
    signature = xp.where(attractor, (flow > 0).astype(xp.float64) @ weights, -1.0)
    ordered = xp.sort(signature, axis=1)
    distinct = ((ordered[:, 1:] != ordered[:, :-1]) & (ordered[:, 1:] >= 0)).sum(axis=1) + (ordered[:, 0] >= 0)
    return to_host(distinct).astype(np.int64)


def mcl_job(sub, cfg, xp):
    """MCL cluster counts of a group's tokens as a start.share_tokens job (n_tokens, compute); `sub` a GroupSubsample."""

    per_block = max(1, CHUNK_ELEMENTS // (sub.width * sub.width))

    def compute(index):
        tokens = np.arange(len(sub))[index]
        # Padded a block at a time: the [t, width, d] points and [t, width, width] flows stay bounded.
        counts = [mcl_cluster_counts(sub[tokens[s : s + per_block]], cfg.mcl_expansion, cfg.mcl_inflation,
                                     cfg.mcl_iters, xp) for s in range(0, len(tokens), per_block)]
        return (np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64),)

    return len(sub), compute
