"""Run under `mpirun -n N`: every rank claims from build_dict's shared counter, busy between claims.

Rank 0 writes {rank: [claimed numbers]} to argv[1]. Rank 0 claims slowly and polls, so the
others' claims must complete while it is busy (the passive-target case).
"""
import json
import sys
import time

from dist_sense.comm import open_comm

LIMIT = int(sys.argv[2])
comm = open_comm()
claimed = []
with comm.work_counter() as counter:
    while (number := counter.claim()) < LIMIT:
        claimed.append(number)
        end = time.perf_counter() + (0.01 if comm.rank == 0 else 0.001)
        while time.perf_counter() < end:
            counter.poll()
everyone = comm.gather(claimed)
if comm.rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(everyone, f)
