"""Checkpoints of the student trainer: DeepSpeed's save/load plus what it does not keep.

Each RUN/student/checkpoints/stepN holds, besides the engine state, the run identity (labels,
dictionary, teacher and student it belongs to), the data position and every rank's RNG state,
so a rerun continues exactly where the last complete checkpoint left off, and a checkpoint
of another run is refused with a message naming what differs.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from dist_sense import comm
from dist_sense.formats.labels import LabelData
from dist_sense.formats.manifest import ManifestError

log = comm.get_logger("dist_sense.checkpoints")

KEEP_CHECKPOINTS = 2
"""Older step checkpoints are deleted once a newer one is complete."""


class CheckpointError(ManifestError):
    """A checkpoint directory that belongs to another run, or cannot be resumed; the message names it."""


def check_checkpoint_identity(ckpt_dir: Path, identity: dict, found: dict | None = None, source: Path | None = None) -> None:
    """Refuse checkpoints written by a run with other labels, dictionary, teacher or student."""
    source = source or ckpt_dir / "run.json"
    if found is None:
        if not source.is_file():
            return
        found = json.loads(source.read_text())
    differ = sorted(k for k in set(identity) | set(found) if identity.get(k) != found.get(k))
    if differ:
        details = "; ".join(f"{k}: checkpoint {found.get(k)!r}, this run {identity.get(k)!r}" for k in differ)
        raise CheckpointError(f"{source}: the checkpoints in {ckpt_dir} belong to another run ({details}); "
                              f"use another run_dir or delete {ckpt_dir} to start over")


def latest_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_checkpoint(engine, ckpt_dir: Path, step: int, data: LabelData, identity: dict) -> None:
    """All ranks: a DeepSpeed checkpoint tagged stepN with data position and every rank's RNG."""
    client = {"dist_sense": {"identity": identity, "data": data.position(), "rng": comm.all_gather_object(rng_state()),
                             "world_size": comm.detect().world_size}}
    engine.save_checkpoint(str(ckpt_dir), tag=f"step{step}", client_state=client)
    if comm.detect().is_main:
        tags = sorted((p for p in ckpt_dir.glob("step*") if p.is_dir()), key=lambda p: int(p.name[4:] or 0))
        for old in tags[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint step%d saved in %s", step, ckpt_dir)


def resume(engine, ckpt_dir: Path, identity: dict, data: LabelData) -> int:
    """Load the newest checkpoint if there is one; return the global step to continue from."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return 0
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise CheckpointError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint; delete {ckpt_dir} to start over")
    state = (client or {}).get("dist_sense")
    if state is None:
        raise CheckpointError(f"{ckpt_dir / tag}: not written by dist_sense (no run identity); delete {ckpt_dir}")
    check_checkpoint_identity(ckpt_dir, identity, found=state["identity"], source=ckpt_dir / tag)
    data.restore(state["data"])
    env = comm.detect()
    if len(state["rng"]) == env.world_size:
        set_rng_state(state["rng"][env.rank])
    else:
        log.warning("checkpoint from %d ranks, now %d: RNG streams restart", len(state["rng"]), env.world_size)
    log.info("resumed from %s at step %d (data position %s)", ckpt_dir / tag, engine.global_steps, state["data"])
    return int(engine.global_steps)
