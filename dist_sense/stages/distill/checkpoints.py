"""Checkpoints of the student trainer: DeepSpeed's save/load plus what it does not keep.

Each RUN/student/checkpoints/stepN holds, besides the engine state, the run identity (labels,
dictionary, teacher and student it belongs to), the data position and every rank's RNG state,
so a rerun continues exactly where the last complete checkpoint left off, and a checkpoint
of another run is refused with a message naming what differs.

A checkpoint is complete once rank 0 has written its marker, stepN/COMPLETE_MARKER (the size
of every file, after all ranks finished writing), and only then `latest`, both atomically: a
crash mid-save leaves a directory without a marker, which is never resumed from. A rerun tries
the checkpoints newest first and skips, with a log line naming it and why, one that is damaged
for any rank (a file missing or cut short, `latest` naming a missing directory); every rank
checks the files it reads and all ranks agree (all_gather) before anything is loaded.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from dist_sense import comm
from dist_sense.formats.labels import LabelData
from dist_sense.formats.manifest import ManifestError, atomic_write_bytes, atomic_write_json
from dist_sense.runtime.faults import crash_point

log = comm.get_logger("dist_sense.checkpoints")

KEEP_CHECKPOINTS = 2
"""Older step checkpoints are deleted once a newer one is complete."""
COMPLETE_MARKER = "dist_sense_complete.json"
"""Written last into stepN/ by rank 0: the checkpoint's files and sizes, and how many ranks wrote it."""
UNFINISHED = "no completion marker (its save did not finish)"
_PARTITION = re.compile(r"zero_pp_rank_(\d+)_")


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


def step_of(tag: str) -> int:
    return int(tag[4:]) if tag.startswith("step") and tag[4:].isdigit() else -1


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


# ----------------------------------------------------------------------------- saving


def save_checkpoint(engine, ckpt_dir: Path, step: int, data: LabelData, identity: dict) -> None:
    """All ranks: a DeepSpeed checkpoint tagged stepN with data position and every rank's RNG, then
    (rank 0, once every rank has written its files) its completion marker and `latest`."""
    env, tag = comm.detect(), f"step{step}"
    client = {"dist_sense": {"identity": identity, "data": data.position(), "rng": comm.all_gather_object(rng_state()),
                             "world_size": env.world_size}}
    if env.is_main and (ckpt_dir / tag).exists():  # left by a save that was cut short, or damaged: never mixed in
        shutil.rmtree(ckpt_dir / tag)
    comm.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False)
    crash_point("distill.save")  # every file written, no marker yet
    _sync_own_files(ckpt_dir / tag, env.rank)
    comm.barrier()  # every rank's files are written and on disk
    if env.is_main:
        files = {str(p.relative_to(ckpt_dir / tag)): p.stat().st_size for p in sorted((ckpt_dir / tag).rglob("*"))
                 if p.is_file()}
        atomic_write_json(ckpt_dir / tag / COMPLETE_MARKER, {"tag": tag, "step": step, "world_size": env.world_size,
                                                              "files": files})
        atomic_write_bytes(ckpt_dir / "latest", tag.encode())
        _remove_old(ckpt_dir, step)
    comm.barrier()  # no rank goes on (or exits) before the checkpoint is committed
    log.info("checkpoint %s saved in %s", tag, ckpt_dir)


def _sync_own_files(path: Path, rank: int) -> None:
    """fsync the files of `path` this rank wrote (its optimizer partition; rank 0 also the shared ones),
    so the marker never reaches the disk before them."""
    for file in path.rglob("*"):
        owner = _PARTITION.search(file.name)
        if file.is_file() and (int(owner.group(1)) == rank if owner else rank == 0):
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def _remove_old(ckpt_dir: Path, step: int) -> None:
    """Keep the KEEP_CHECKPOINTS newest complete checkpoints up to `step`; delete the rest (older ones,
    unfinished saves, and checkpoints past `step` left by a run that was resumed from an earlier one)."""
    tags = sorted((p for p in ckpt_dir.glob("step*") if p.is_dir()), key=lambda p: step_of(p.name), reverse=True)
    kept = [p for p in tags if step_of(p.name) <= step and (p / COMPLETE_MARKER).is_file()][:KEEP_CHECKPOINTS]
    for old in tags:
        if old not in kept:
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- which checkpoint to resume


def inspect_checkpoints(ckpt_dir: Path, rank: int, world_size: int) -> dict[str, str | None]:
    """This rank's view: every checkpoint tag (step directories and what `latest` names) -> None if
    this rank can load it, else what is wrong. Reads each marker, stats every file and opens the
    files this rank loads (the model states and its own optimizer partition)."""
    tags = {p.name for p in ckpt_dir.glob("step*") if p.is_dir()} if ckpt_dir.is_dir() else set()
    latest = latest_tag(ckpt_dir)
    if latest:
        tags.add(latest)
    return {tag: _problem(ckpt_dir / tag, rank, world_size, named_by_latest=tag == latest) for tag in tags}


def _problem(path: Path, rank: int, world_size: int, named_by_latest: bool) -> str | None:
    if not path.is_dir():
        return "named by `latest`, but its directory is missing" if named_by_latest else "missing"
    try:
        marker = json.loads((path / COMPLETE_MARKER).read_text())
        files = dict(marker["files"])
    except FileNotFoundError:  # `latest` is written after the marker: naming this one, it is no cut-short save
        return f"no {COMPLETE_MARKER}, yet `latest` names it (older dist_sense, or damaged)" if named_by_latest else UNFINISHED
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable {COMPLETE_MARKER} ({err})"
    if marker.get("world_size") != world_size and any(_PARTITION.search(name) for name in files):
        return (f"written by {marker.get('world_size')} ranks, this run has {world_size} (ZeRO optimizer "
                f"partitions are per rank: resume with {marker.get('world_size')} ranks)")
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is {file.stat().st_size} bytes, {size} when saved (cut short or overwritten)"
    for name in files:
        owner = _PARTITION.search(name)
        if name.endswith(".pt") and (owner is None or int(owner.group(1)) == rank):
            try:
                zipfile.ZipFile(path / name).close()  # torch.save's archive: its index is at the end
            except (OSError, zipfile.BadZipFile) as err:
                return f"{name} is not a readable torch file ({err})"
    return None


def usable_tags(views: list[dict[str, str | None]]) -> tuple[list[str], dict[str, list[str]]]:
    """From every rank's view: the tags no rank found a problem with, newest first, and what is wrong
    with each of the others (once if every rank found the same, else rank by rank)."""
    tags = sorted(set().union(*views), key=step_of, reverse=True)
    usable, problems = [], {}
    for tag in tags:
        found = [(rank, view.get(tag, "its directory is missing")) for rank, view in enumerate(views)]
        found = [(rank, problem) for rank, problem in found if problem is not None]
        if not found:
            usable.append(tag)
        elif len({problem for _, problem in found}) == 1 and len(found) == len(views):
            problems[tag] = [found[0][1]]
        else:
            problems[tag] = [f"rank {rank}: {problem}" for rank, problem in found]
    return usable, problems


def resume(engine, ckpt_dir: Path, identity: dict, data: LabelData) -> int:
    """Load the newest checkpoint every rank can load; return the global step to continue from
    (0 with no checkpoint). Raise CheckpointError if there are checkpoints but none loads."""
    env = comm.detect()
    usable, problems = usable_tags(comm.all_gather_object(inspect_checkpoints(ckpt_dir, env.rank, env.world_size)))
    for tag in sorted([*usable, *problems], key=step_of, reverse=True):
        if tag in usable:
            error, client = _load(engine, ckpt_dir, tag)
            errors = comm.all_gather_object(error)  # a load that failed on any rank is skipped by all
            if not any(errors):
                return _restore(engine, ckpt_dir, tag, client, identity, data)
            problems[tag] = [f"rank {rank}: {error}" for rank, error in enumerate(errors) if error]
        if env.is_main:  # every rank knows the same problems
            log.warning("skipping checkpoint %s: %s", ckpt_dir / tag, "; ".join(problems[tag]))
    if all(found == [UNFINISHED] for found in problems.values()):
        return 0  # no checkpoint was ever completed here (a save cut short is none): start from scratch
    details = "; ".join(f"{tag}: {', '.join(problems[tag])}" for tag in sorted(problems, key=step_of, reverse=True))
    raise CheckpointError(f"{ckpt_dir}: no checkpoint can be resumed ({details}); restore a checkpoint, or delete "
                          f"{ckpt_dir} to start over")


def _load(engine, ckpt_dir: Path, tag: str) -> tuple[str | None, dict | None]:
    """engine.load_checkpoint on this rank: (None, client state) if it loaded, else (the error, None).
    A later load of an older tag overwrites whatever a failed one had loaded."""
    try:
        path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    except Exception as err:  # noqa: BLE001 - whatever stops this one loading, the next older one is tried
        return f"{type(err).__name__}: {err}", None
    return (None, client or {}) if path is not None else ("DeepSpeed found no model states", None)


def _restore(engine, ckpt_dir: Path, tag: str, client: dict, identity: dict, data: LabelData) -> int:
    state = client.get("dist_sense")
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
