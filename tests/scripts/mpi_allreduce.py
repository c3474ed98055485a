"""Run under `mpirun -n N`: rank detection from MPI variables and a summing Allreduce."""
import json
import sys

import numpy as np

from dist_sense import dist

env = dist.detect()
comm = dist.mpi_comm()
allreduce = dist.mpi_allreduce_sum(comm)
total = allreduce(np.full(4, env.rank + 1, dtype=np.float64))
gathered = comm.allgather({"rank": env.rank, "local_rank": env.local_rank, "world": env.world_size, "launcher": env.launcher})
if env.rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump({"sum": total.tolist(), "ranks": gathered, "mpi_size": comm.Get_size()}, f)
