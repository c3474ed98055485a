"""Stage 1: teacher hidden states under ZeRO-3 -> RUN/hidden/.

    deepspeed --num_gpus N launcher/extract.py --config CONFIG [key=value ...]
    srun python launcher/extract.py --config CONFIG [key=value ...]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dist_sense.cli import run_stage  # noqa: E402
from dist_sense.stages import extract

if __name__ == "__main__":
    run_stage(__doc__, extract.run)
