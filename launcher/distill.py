"""Stage 3: distil a student against RUN/labels under DeepSpeed ZeRO-2 -> RUN/student/.

    deepspeed --num_gpus N launcher/distill.py --deepspeed ds_configs/z2.json --config CONFIG [key=value ...]
    srun python launcher/distill.py --deepspeed ds_configs/z2.json --config CONFIG [key=value ...]

A rerun resumes from the newest checkpoint in RUN/student/checkpoints.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dist_sense.cli import run_stage  # noqa: E402
from dist_sense.stages import distill

if __name__ == "__main__":
    run_stage(__doc__, distill.run)
