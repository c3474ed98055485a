"""The GLUE setting's first stage: fine-tune the teacher on a labelled task under DeepSpeed ZeRO-2
(stage: the run; data: rank-aligned batches with a resumable position; train: one step, held-out
accuracy, metrics). Checkpoints and SIGTERM handling are distill's (stages/distill/)."""
from dist_sense.stages.finetune.stage import run

__all__ = ["run"]
