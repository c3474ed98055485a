"""Stage 2: RUN/hidden/ -> RUN/dictionary/ by MPI k-means over tiles of tokens.

    mpirun -n N python launcher/build_dict.py --config CONFIG [key=value ...]
    srun --mpi=pmi2 python launcher/build_dict.py --config CONFIG [key=value ...]
    python launcher/build_dict.py --config CONFIG [key=value ...]        (one process)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dist_sense.cli import run_stage  # noqa: E402
from dist_sense.stages import build_dict  # noqa: E402

if __name__ == "__main__":
    run_stage(__doc__, build_dict.run, mpi=True)
