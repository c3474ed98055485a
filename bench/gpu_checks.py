"""The GPU checks of the benchmark issue, for a machine with a CUDA GPU and cupy.

    python -m bench.gpu_checks            # on a GPU node: writes bench/results_gpu.json
    python -m bench.gpu_checks --dry-run  # anywhere: numpy stands in for cupy, tiny sizes

1. cupy k-means equals numpy k-means on the same tile (centres, inertia);
2. the assignment pass's achieved memory bandwidth against the GPU's peak
   (bytes the pass must read: the tile's vectors and its centres);
3. batched k-means on the GPU against the reference loop (scikit-learn KMeans per token on
   this machine's CPU) at the reference's width, d=4096, up to 1000 vectors per token
   (Gaussian mixtures: no 4096-wide teacher can be fetched offline);
4. extraction in bf16 against a plain HF forward of the same batches on the GPU.
NCCL + bf16 runs of the whole pipeline: bench/gpu_pipeline.sh. Without a GPU (and without
--dry-run) this prints why and records nothing: no GPU figure is ever made up.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bench import common

RESULTS_GPU = common.ROOT / "bench" / "results_gpu.json"


def mixture(n_tokens: int, per_token: int, d: int, k: int, seed: int = 0):
    """(vectors [n_tokens * per_token, d] float32, slots, priorities): k Gaussian blobs per token."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_tokens, k, d)).astype(np.float32) * 4
    pick = rng.integers(0, k, (n_tokens, per_token))
    noise = rng.standard_normal((n_tokens, per_token, d)).astype(np.float32)
    vectors = (np.take_along_axis(centres, pick[..., None], axis=1) + noise).reshape(-1, d)
    slots = np.repeat(np.arange(n_tokens), per_token)
    return vectors, slots, rng.integers(0, 2**63, len(slots), dtype=np.uint64)


def synchronize(xp) -> None:
    if xp.__name__ == "cupy":
        xp.cuda.Stream.null.synchronize()


def cluster(data, xp, k: int):
    from dist_sense.config import KMeansConfig
    from dist_sense.kmeans.tile import cluster_tile, make_local_tile
    from dist_sense.runtime.backend import to_host

    vectors, slots, priority = data
    cfg = KMeansConfig(k=k, max_iter=50, tol=1e-4, subsample=256)
    synchronize(xp)
    start = time.perf_counter()
    local, _ = make_local_tile(vectors, slots, priority, int(slots.max()) + 1, xp)
    result = cluster_tile(local, cfg, xp=xp)
    synchronize(xp)
    return time.perf_counter() - start, result, to_host


def check_equal(xp, dry: bool) -> dict:
    data = mixture(16 if dry else 256, 200 if dry else 500, 64 if dry else 768, 20)
    gpu_s, on_gpu, to_host = cluster(data, xp, 20)
    cpu_s, on_cpu, _ = cluster(data, np, 20)
    (gpu_centres, gpu_valid, _), (cpu_centres, cpu_valid, _) = on_gpu.dense(), on_cpu.dense()
    same_valid = bool(np.array_equal(gpu_valid, cpu_valid))
    diff = float(np.abs(to_host(gpu_centres)[cpu_valid] - cpu_centres[cpu_valid]).max()) if same_valid else None
    return {"same_senses": same_valid, "max_centre_abs_diff": diff, "inertia_ratio": on_gpu.inertia / on_cpu.inertia,
            "gpu_s": gpu_s, "numpy_s": cpu_s, "speedup_vs_numpy": cpu_s / gpu_s}


def peak_bandwidth(xp) -> float | None:
    """Bytes/s the GPU's memory can move, from its clock and bus width (None off a GPU)."""
    if xp.__name__ != "cupy":
        return None
    attributes = xp.cuda.runtime.getDeviceProperties(0)
    return 2 * attributes["memoryClockRate"] * 1e3 * attributes["memoryBusWidth"] / 8


def assignment_bandwidth(xp, dry: bool) -> dict:
    from dist_sense.kmeans.lloyd import assign_senses, plan_chunks
    from dist_sense.kmeans.tile import make_local_tile

    n_tokens, per_token, d, k = (16, 100, 64, 20) if dry else (256, 1000, 4096, 20)
    vectors, slots, priority = mixture(n_tokens, per_token, d, k, seed=1)
    local, _ = make_local_tile(vectors, slots, priority, n_tokens, xp)
    rng = np.random.default_rng(0)
    centres = xp.asarray(vectors[rng.choice(len(vectors), n_tokens * k, replace=False)].reshape(n_tokens, k, d))
    valid = xp.ones((n_tokens, k), dtype=bool)
    chunks = plan_chunks(local.offsets, d, xp)
    assign_senses(local, chunks, centres, valid, xp)  # warm-up (kernel compilation)
    synchronize(xp)
    repeats = 5
    start = time.perf_counter()
    for _ in range(repeats):
        assign_senses(local, chunks, centres, valid, xp)
    synchronize(xp)
    seconds = (time.perf_counter() - start) / repeats
    moved = 4 * (vectors.size + centres.size)
    peak = peak_bandwidth(xp)
    return {"seconds": seconds, "bytes_read": moved, "achieved_gb_s": moved / seconds / 1e9,
            "peak_gb_s": peak / 1e9 if peak else None, "share_of_peak": moved / seconds / peak if peak else None,
            "shape": [n_tokens, per_token, d, k]}


def versus_sklearn(xp, dry: bool) -> dict:
    from sklearn.cluster import KMeans

    n_tokens, per_token, d = (8, 100, 64) if dry else (64, 1000, 4096)
    data = mixture(n_tokens, per_token, d, 20, seed=2)
    ours_s, result, _ = cluster(data, xp, 20)
    vectors, slots, _ = data
    start, inertia = time.perf_counter(), 0.0
    for token in range(n_tokens):
        model = KMeans(n_clusters=20, init="k-means++", n_init=1, max_iter=50, tol=1e-4, random_state=0)
        inertia += float(model.fit(vectors[slots == token]).inertia_)
    loop_s = time.perf_counter() - start
    return {"speedup": loop_s / ours_s, "inertia_ratio": result.inertia / inertia, "ours_s": ours_s,
            "sklearn_loop_s": loop_s, "tokens": n_tokens, "vectors_per_token": per_token, "d": d}


def extraction_bf16(dry: bool) -> dict:
    """bench.extract_vs_hf_forward's comparison, in bf16 on the GPU."""
    if dry:
        return {"skipped": "dry run: extraction needs the GPU"}
    import torch
    from transformers import AutoModel

    from dist_sense.model.teacher import resolve_model_path

    batches = common.text_batches(2000, 64, 128)
    model = AutoModel.from_pretrained(resolve_model_path(common.DEMO_MODEL), dtype=torch.bfloat16).cuda().eval()
    tokens = int(sum(int(mask.sum()) for _, mask in batches))
    with torch.no_grad():
        for ids, mask in batches[:3]:
            model(input_ids=ids.cuda(), attention_mask=mask.cuda())
        torch.cuda.synchronize()
        start = time.perf_counter()
        for ids, mask in batches:
            model(input_ids=ids.cuda(), attention_mask=mask.cuda()).last_hidden_state.float().cpu()
        torch.cuda.synchronize()
    hf_s = time.perf_counter() - start
    return {"hf_forward_bf16_tokens_per_s": tokens / hf_s,
            "note": "the whole extract stage in bf16: bench/gpu_pipeline.sh (tokens/s in RUN/tb/extract)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="numpy for cupy, tiny sizes: checks the script itself")
    args = parser.parse_args()
    common.single_process_env()
    from dist_sense.runtime import backend
    xp = np if args.dry_run else backend.get_xp(0)
    if xp is np and not args.dry_run:
        print("no usable CUDA GPU (cupy reports none): nothing measured, nothing recorded")
        return
    device = "numpy (dry run)" if args.dry_run else xp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    results = {"device": device, "date": time.strftime("%Y-%m-%d"),
               "cupy_equals_numpy": check_equal(xp, args.dry_run),
               "assignment_bandwidth": assignment_bandwidth(xp, args.dry_run),
               "kmeans_vs_sklearn_d4096": versus_sklearn(xp, args.dry_run),
               "extraction_bf16": extraction_bf16(args.dry_run)}
    print(json.dumps(results, indent=2))
    if not args.dry_run:
        RESULTS_GPU.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
