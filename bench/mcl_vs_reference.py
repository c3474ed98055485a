"""MCL cluster counts of k_policy=mcl (batched, kmeans/mcl.py) against the reference's way: the
markov-clustering package called once per token.

Data: real hidden states of the demo teacher (all-MiniLM-L6-v2, d=384) over WordNet text, as
kmeans_vs_faiss; the first TOKENS (24) tokens with at least MIN_VECTORS (40) vectors, each with every
vector it has (up to the reference's 1000). Both sides build the same affinities,
1/(euclidean + 0.01) with self-loops 1, and run expansion 2, inflation 1.65, up to 100
iterations. Ours: the stage's own path for one tile (the vectors gathered, grouped by count,
MCL on padded stacks, one process). The reference: scipy's cdist, then `run_mcl` and
`get_clusters` per token in a Python loop. speedup = reference seconds / ours;
counts_equal = share of tokens for which both find the same number of clusters. Seconds are
the best of ROUNDS alternating rounds.
"""
from __future__ import annotations

import time

import numpy as np

from bench import common

TOKENS, MIN_VECTORS, ROUNDS = 24, 40, 2


def ours(per_token: list[np.ndarray]) -> tuple[float, np.ndarray]:
    from dist_sense.config import KMeansConfig
    from dist_sense.kmeans.tile import make_local_tile, mcl_clusters
    from dist_sense.kmeans.types import ONE_PROCESS, TileRun

    vectors = np.concatenate(per_token)
    slots = np.repeat(np.arange(len(per_token)), [len(v) for v in per_token])
    priority = np.random.default_rng(0).integers(0, 2**63, len(slots), dtype=np.uint64)
    start = time.perf_counter()
    local, _ = make_local_tile(vectors, slots, priority, len(per_token), np)
    run = TileRun(local, KMeansConfig(k_policy="mcl"), ONE_PROCESS, np)
    counts = mcl_clusters(run, np.diff(local.offsets))
    return time.perf_counter() - start, counts


def reference(per_token: list[np.ndarray]) -> tuple[float, np.ndarray]:
    import markov_clustering as mc
    from scipy.spatial.distance import cdist

    start, counts = time.perf_counter(), []
    for points in per_token:
        affinity = 1.0 / (cdist(points, points) + 0.01)
        counts.append(len(mc.get_clusters(mc.run_mcl(affinity, expansion=2, inflation=1.65, iterations=100))))
    return time.perf_counter() - start, np.asarray(counts)


def main() -> dict:
    common.single_process_env()
    from dist_sense.runtime.process import retain_freed_memory

    retain_freed_memory()
    vectors = common.per_token_vectors(common.teacher_run(), MIN_VECTORS)
    per_token = [v[:1000] for v in list(vectors.values())[:TOKENS]]
    rounds = {"ours": [], "reference": []}
    for _ in range(ROUNDS):
        rounds["ours"].append(ours(per_token))
        rounds["reference"].append(reference(per_token))
    ours_s, ours_counts = min(rounds["ours"], key=lambda r: r[0])
    ref_s, ref_counts = min(rounds["reference"], key=lambda r: r[0])
    figures = {
        "speedup": ref_s / ours_s, "counts_equal": float((ours_counts == ref_counts).mean()),
        "ours_s": ours_s, "reference_s": ref_s, "tokens": len(per_token),
        "vectors": int(sum(len(v) for v in per_token)), "clusters_mean": float(ref_counts.mean()),
        "clusters_max": int(ref_counts.max()),
        **{f"rounds_{name}_s": [round(t, 2) for t, _ in r] for name, r in rounds.items()},
    }
    return common.record("mcl_vs_reference", figures, {"speedup": ">= 1", "counts_equal": ">= 1"})


if __name__ == "__main__":
    main()
