"""Stage 3a: the teacher's sense of every token of the distillation corpus -> RUN/labels/.

    deepspeed --num_gpus N launcher/label.py --config CONFIG [key=value ...]
    srun python launcher/label.py --config CONFIG [key=value ...]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dist_sense.cli import run_stage  # noqa: E402
from dist_sense.stages import label

if __name__ == "__main__":
    run_stage(__doc__, label.run)
