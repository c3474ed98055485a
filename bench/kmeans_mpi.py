"""The k-means stage on 2 MPI ranks against 1 rank, one thread per rank, same hidden/ and seed.

Both runs build the whole dictionary (read the shards in claimed units, bucket rows by
tile, cluster, write) from the same real hidden states; the timer starts after MPI
start-up and imports (torch's TensorBoard writer included, see build_dict_timed.py).
speedup = 1-rank seconds / 2-rank seconds (2.0 would be perfect scaling), each the best of
5 alternating runs. The ranks claim reading units from a shared counter (an MPI window,
comm.mpi.MpiComm.work_counter); a rank busy reading polls MPI now and then, since with
MPICH a passive-target add completes only while its target is inside an MPI call: without
the poll a claim waited for rank 0's own next claim, 22 ms instead of 0.1 ms.
"""
from __future__ import annotations

import json
import shutil

from bench import common

# Identical 1-rank builds took 7.4 to 11 s within minutes on the 2-core VM; noise only adds
# time, so the best of 5 estimates the undisturbed time better than the best of 3.
K, ROUNDS = 20, 5


def timed_build(source, ranks: int, tile_tokens: int) -> float:
    import helpers as testing
    run_dir = common.WORK / f"kmeans_mpi_{ranks}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    (run_dir / "hidden").symlink_to(source / "hidden")
    args = [f"run_dir={run_dir}", f"kmeans.k={K}", f"kmeans.tile_tokens={tile_tokens}"]
    env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = testing.run_mpirun("bench/build_dict_timed.py", args, nproc=ranks, timeout=900, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]


def main() -> dict:
    common.single_process_env()
    source = common.teacher_run()
    tile_tokens = 256  # several tiles, so both ranks always have work
    ones, twos = [], []
    for _ in range(ROUNDS):  # alternating, best of each: drift in machine load hits both alike
        ones.append(timed_build(source, 1, tile_tokens))
        twos.append(timed_build(source, 2, tile_tokens))
    one, two = min(ones), min(twos)
    figures = {"speedup": one / two, "one_rank_s": one, "two_ranks_s": two, "k": K, "tile_tokens": tile_tokens,
               "rounds_one_rank_s": [round(t, 2) for t in ones], "rounds_two_ranks_s": [round(t, 2) for t in twos]}
    return common.record("kmeans_mpi", figures, {"speedup": ">= 1.7"})


if __name__ == "__main__":
    main()
