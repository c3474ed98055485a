"""The DeepSpeed engine of a training stage (distill, finetune): its config, from the stage's
config section, and its start (parameter groups, warm-up and cosine schedule).

The JSON file (`<section>.ds_config`) holds engine settings only: ZeRO stage 0-2, precision,
offload. Batch sizes, the learning rate and weight decay come from the section, so one
file serves any number of ranks; a file that sets them itself is refused.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

from dist_sense import comm
from dist_sense.config import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
MIN_LR_RATIO = 0.1
"""The cosine schedule ends at this fraction of the peak learning rate."""
ENGINE_OWNED_BY_CONFIG = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "scheduler")


def training_engine_config(section, name: str, micro: int, accum: int, trains: str) -> dict:
    """`section.ds_config` with batch sizes, optimizer values and bf16 "auto" filled in.

    name: the section's key ("distill", "finetune"), for messages; trains: what the stage trains."""
    path = Path(section.ds_config)
    if not path.is_absolute() and not path.exists():  # a launch from outside the checkout
        path = REPO_ROOT / path
    try:
        config = copy.deepcopy(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{name}.ds_config={path}: cannot read DeepSpeed JSON ({err})") from None
    for key in ENGINE_OWNED_BY_CONFIG:
        if key in config:
            raise ConfigError(f"{path}: {key!r} is set from {name}.* (batch sizes, warmup_steps, steps); "
                              f"remove it from the DeepSpeed JSON")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"{path}: zero_optimization.stage={stage}; the {trains} trains with ZeRO stage 0-2")
    for precision in ("bf16", "fp16"):
        part = config.setdefault(precision, {"enabled": False})
        if part.get("enabled") == "auto":  # bf16 where a GPU can do it; fp32 on CPU
            part["enabled"] = comm.cuda_available() and precision == "bf16"
    params = config.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})
    params.update(lr=section.lr, weight_decay=section.weight_decay)
    # torch's AdamW needs no compiled op; with optimizer offload DeepSpeed's CPU Adam is the fast one.
    offload = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    params.setdefault("torch_adam", offload in ("none", None))
    config.setdefault("steps_per_print", 1 << 30)  # we log ourselves
    config.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum,
                  train_batch_size=section.global_batch_size)
    return config


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier after `step` optimizer steps: linear warm-up, then cosine to MIN_LR_RATIO."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(total - warmup, 1))
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


def start_engine(model, section, config: dict):
    """(deepspeed engine, trained parameter count) of `model` with `config`: AdamW without weight
    decay on biases and norms, `section.warmup_steps` of linear warm-up, then cosine decay over
    `section.steps`."""
    import deepspeed
    import torch

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and "norm" not in n.lower()]
    no_decay = [p for n, p in trainable if not (p.ndim >= 2 and "norm" not in n.lower())]
    groups = [{"params": decay, "weight_decay": section.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    warmup, steps = section.warmup_steps, section.steps

    def schedule(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, steps))

    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config, lr_scheduler=schedule)
    return engine, sum(p.numel() for _, p in trainable)
