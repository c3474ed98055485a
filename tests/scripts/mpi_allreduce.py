"""Run under `mpirun -n N`: rank detection from MPI variables and a summing Allreduce."""
import json
import sys

import numpy as np

from dist_sense.comm import detect, open_comm

env = detect()
comm = open_comm()
total = comm.allreduce(np.full(4, env.rank + 1, dtype=np.float64))
gathered = comm.comm.allgather({"rank": env.rank, "local_rank": env.local_rank, "world": env.world_size, "launcher": env.launcher})
if env.rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump({"sum": total.tolist(), "ranks": gathered, "mpi_size": comm.world}, f)
