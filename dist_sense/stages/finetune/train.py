"""The pieces of the fine-tuning loop: the engine config, one optimizer step, held-out accuracy, the metrics log."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from dist_sense import comm
from dist_sense.config import ConfigError, RunConfig
from dist_sense.formats.tasks import EncodedSplit
from dist_sense.runtime.metrics import summary_writer
from dist_sense.stages.distill.stopping import StopOnSignal
from dist_sense.stages.finetune.data import TaskBatches, held_out_batches

REPO_ROOT = Path(__file__).resolve().parents[3]
ENGINE_OWNED_BY_CONFIG = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "scheduler")


def engine_config(cfg: RunConfig, micro: int, accum: int) -> dict:
    """The DeepSpeed JSON of finetune.ds_config with batch sizes, optimizer values and bf16 "auto" filled in."""
    path = Path(cfg.finetune.ds_config)
    if not path.is_absolute() and not path.exists():  # a launch from outside the checkout
        path = REPO_ROOT / path
    try:
        config = copy.deepcopy(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"finetune.ds_config={path}: cannot read DeepSpeed JSON ({err})") from None
    for key in ENGINE_OWNED_BY_CONFIG:
        if key in config:
            raise ConfigError(f"{path}: {key!r} is set from finetune.* (batch sizes, warmup_steps, steps); "
                              f"remove it from the DeepSpeed JSON")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"{path}: zero_optimization.stage={stage}; the teacher fine-tunes with ZeRO stage 0-2")
    for precision in ("bf16", "fp16"):
        section = config.setdefault(precision, {"enabled": False})
        if section.get("enabled") == "auto":  # bf16 where a GPU can do it; fp32 on CPU
            section["enabled"] = comm.cuda_available() and precision == "bf16"
    params = config.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})
    params.update(lr=cfg.finetune.lr, weight_decay=cfg.finetune.weight_decay)
    # torch's AdamW needs no compiled op (CPU runs); with optimizer offload DeepSpeed's CPU Adam is the fast one.
    offload = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    params.setdefault("torch_adam", offload in ("none", None))
    config.setdefault("steps_per_print", 1 << 30)  # we log ourselves
    config.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum,
                  train_batch_size=cfg.finetune.global_batch_size)
    return config


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


class MetricsLog:
    """Rank 0's JSON lines (OUTPUT/metrics.jsonl), TensorBoard (RUN/tb/finetune) and progress bar; no-ops elsewhere."""

    def __init__(self, cfg: RunConfig, out_dir: Path, start_step: int):
        from tqdm import tqdm

        self.main = comm.detect().is_main
        self.path = out_dir / "metrics.jsonl"
        self.tb = summary_writer(cfg.run_path, "finetune")
        self.bar = tqdm(total=cfg.finetune.steps, initial=start_step, unit="step", desc="finetune",
                        disable=not self.main)
        if self.main and self.path.is_file():
            # Steps after the checkpoint resumed from were never committed (nor a line cut by a kill): drop them.
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, values: dict) -> None:
        if not self.main:
            return
        for tag, value in values.items():
            self.tb.add_scalar(tag, value, step)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")

    def train(self, step: int, stats: dict, lr: float, grad_norm) -> None:
        values = {"loss/ce": stats["loss"], "acc/train": stats["accuracy"], "lr": lr}
        if grad_norm is not None:
            values["grad_norm"] = float(grad_norm)
        self.write(step, values)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{stats['loss']:.4f}", acc=f"{stats['accuracy']:.3f}")

    def close(self) -> None:
        self.bar.close()
        self.tb.close()


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf
