"""The pieces of the fine-tuning loop: the engine config, one optimizer step, held-out accuracy, the metrics log."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from dist_sense import comm
from dist_sense.config import RunConfig
from dist_sense.formats.tasks import EncodedSplit
from dist_sense.runtime.metrics import StepLog
from dist_sense.stages.distill.stopping import StopOnSignal
from dist_sense.stages.engine import training_engine_config
from dist_sense.stages.finetune.data import TaskBatches, held_out_batches


def engine_config(cfg: RunConfig, micro: int, accum: int) -> dict:
    """finetune.ds_config with batch sizes, optimizer values and bf16 "auto" filled in (stages/engine.py)."""
    return training_engine_config(cfg.finetune, "finetune", micro, accum, "teacher")


def _on(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(engine, data: TaskBatches, accum: int, stop: StopOnSignal | None = None) -> dict:
    """One optimizer step (accum micro-batches per rank): cross-entropy averaged over ranks, train accuracy,
    and in "stop" how many ranks received SIGTERM (reduced with the metrics: the same on every rank)."""
    sums = torch.zeros(5, dtype=torch.float64, device=comm.device())
    for _ in range(accum):
        batch = _on(data.next_batch(), engine.device)
        logits = engine(batch["input_ids"], batch["attention_mask"], batch["special_mask"])
        loss = F.cross_entropy(logits.float(), batch["labels"])
        engine.backward(loss)
        engine.step()
        correct = (logits.detach().argmax(dim=-1) == batch["labels"]).sum()
        sums[:4] += torch.stack([loss.detach().double(), correct.double(),
                                 torch.tensor(float(len(batch["labels"])), dtype=torch.float64, device=sums.device),
                                 torch.ones((), dtype=torch.float64, device=sums.device)])
    sums[4] = stop.flag() if stop else 0.0  # read after the step's work: a signal during it stops at this step
    comm.all_reduce_sum(sums)
    loss_sum, correct, n, micro, votes = sums.tolist()
    return {"loss": loss_sum / micro, "accuracy": correct / max(n, 1), "stop": int(votes)}


@torch.no_grad()
def evaluate(engine, encoded: EncodedSplit | None, micro: int, pad_id: int, prefix: str = "eval") -> dict | None:
    """Cross-entropy and accuracy on a held-out split, summed over ranks (None without one)."""
    if encoded is None or len(encoded) == 0:
        return None
    env, module = comm.detect(), engine.module
    module.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=comm.device())
    for batch in held_out_batches(encoded, env.rank, env.world_size, micro, pad_id):
        batch = _on(batch, engine.device)
        logits = module(batch["input_ids"], batch["attention_mask"], batch["special_mask"]).float()
        loss = F.cross_entropy(logits, batch["labels"], reduction="sum")
        correct = (logits.argmax(dim=-1) == batch["labels"]).sum()
        sums += torch.stack([loss.double(), correct.double(),
                             torch.tensor(float(len(batch["labels"])), dtype=torch.float64, device=sums.device)])
    module.train()
    comm.all_reduce_sum(sums)
    loss_sum, correct, n = sums.tolist()
    return {f"{prefix}/loss": loss_sum / n, f"{prefix}/accuracy": correct / n}


class MetricsLog(StepLog):
    """OUTPUT/metrics.jsonl, RUN/tb/finetune (finetune_student for the student baseline) and the progress
    bar (rank 0)."""

    def __init__(self, cfg: RunConfig, out_dir: Path, start_step: int):
        name = "finetune_student" if cfg.finetune.backbone == "student" else "finetune"  # RUN/tb/<name>
        super().__init__(out_dir / "metrics.jsonl", cfg.run_path, name, cfg.finetune.steps, start_step, name)

    def train(self, step: int, stats: dict, lr: float, grad_norm) -> None:
        values = {"loss/ce": stats["loss"], "acc/train": stats["accuracy"], "lr": lr}
        if grad_norm is not None:
            values["grad_norm"] = float(grad_norm)
        self.write(step, values)
        self.step_done(loss=f"{stats['loss']:.4f}", acc=f"{stats['accuracy']:.3f}")
