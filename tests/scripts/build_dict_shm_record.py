"""Run under `mpirun -n N`: note this rank's MPICH files in /dev/shm, then run launcher/build_dict.py.

After MPI_Init, writes the /dev/shm files this process has mapped (and that are still
linked) to $SHM_RECORD/rank-N.txt, one a line, so a test can tell its own job's files from
those of other jobs on the machine; then runs the launcher with the same arguments.
"""
import os
import runpy
import sys
from pathlib import Path

from mpi4py import MPI  # initialises MPI: MPICH's shared memory is mapped from here on

LAUNCHER = Path(__file__).resolve().parents[2] / "launcher" / "build_dict.py"

with open("/proc/self/maps") as maps:
    fields = [line.split() for line in maps]
mapped = sorted({f[5] for f in fields if len(f) == 6 and f[5].startswith("/dev/shm/")})
record = Path(os.environ["SHM_RECORD"]) / f"rank-{MPI.COMM_WORLD.Get_rank()}.txt"
record.write_text("".join(f"{name}\n" for name in mapped))
sys.argv = [str(LAUNCHER), *sys.argv[1:]]
runpy.run_path(str(LAUNCHER), run_name="__main__")
