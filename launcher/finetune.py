"""GLUE setting: fine-tune the teacher on a labelled task under DeepSpeed ZeRO-2 -> RUN/teacher_tuned/final.

    python launcher/finetune.py --config CONFIG [key=value ...]
    deepspeed --num_gpus N launcher/finetune.py --deepspeed ds_configs/z2.json --config CONFIG [key=value ...]

The task comes from task.* (train / validation / test files, text, pair and label fields), the
training settings from finetune.*. The printed folder is the tuned teacher: set model.teacher to it.
A rerun resumes from the newest checkpoint in RUN/teacher_tuned/checkpoints.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dist_sense.cli import run_stage  # noqa: E402
from dist_sense.stages import finetune

if __name__ == "__main__":
    run_stage(__doc__, finetune.run, engine_key="finetune.ds_config")
