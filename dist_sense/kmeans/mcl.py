"""How many senses a token gets under k_policy=mcl: Markov clustering, batched over tokens.

The paper's rule runs MCL (expansion 2, inflation 1.65) on each token's affinities
1/(euclidean + 0.01) and takes a fraction of the clusters found. Here every token of
a tile runs at once on a padded stack of affinity matrices (one batched matmul per
expansion step), not a library call per token.
"""
from __future__ import annotations

import numpy as np

from dist_sense.runtime.backend import to_device, to_host

CHUNK_ELEMENTS = 1 << 25
"""Floats in one padded stack of affinity matrices (bounds memory)."""
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
    flow = _normalise_columns(xp.where(pair, affinity, 0).astype(xp.float32), xp)
    for _ in range(max_iter):
        previous = flow
        for _ in range(expansion - 1):
            flow = flow @ previous
        flow = _normalise_columns(flow**inflation, xp)
        keep = (flow >= MCL_PRUNE) | (flow == flow.max(axis=1, keepdims=True))
        flow = flow * keep
        if bool((xp.abs(flow - previous) <= 1e-8 + 1e-5 * xp.abs(previous)).all()):
            break
    # A cluster is the support of an attractor's row; attractors of one cluster share it.
    # Supports are compared by an exact integer signature (random weights < 2^40, sums < 2^53).
    attractor = (xp.diagonal(flow, axis1=1, axis2=2) > 0) & mask
    weights = to_device(np.random.default_rng(12345).integers(1, 1 << 40, width).astype(np.float64), xp)
    signature = xp.where(attractor, (flow > 0).astype(xp.float64) @ weights, -1.0)
    ordered = xp.sort(signature, axis=1)
    distinct = ((ordered[:, 1:] != ordered[:, :-1]) & (ordered[:, 1:] >= 0)).sum(axis=1) + (ordered[:, 0] >= 0)
    return to_host(distinct).astype(np.int64)
