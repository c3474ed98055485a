"""Stage 3: distil a student against RUN/labels under DeepSpeed ZeRO-2 (stage: the training loop;
checkpoints: resumable state; stopping: SIGTERM to a checkpoint and exit code 3)."""
from dist_sense.stages.distill.stage import run

__all__ = ["run"]
