"""The start of every writing stage: one writer per output, the same inputs as last time, config.json last.

`open_stage(cfg, stage, out_dir, identity, ...)` is entered by every rank once the stage knows
what its result depends on (`identity`: content fingerprints of its input files, the
fingerprints of the manifests it reads, the config values that change its result). Rank 0:
  1. checks that the run directory can be written at all (a read-only or full filesystem is
     reported now, with its path, not after an hour of teacher passes);
  2. takes the stage's lock, RUN/.lock-<output folder> (runtime.rundir.RunLock);
  3. compares `identity` with OUT/identity.json, the record of the run that made what OUT
     holds: equal -> resume or nothing to do; different -> refuse, naming each difference
     and the two ways on; with `restart` (the launchers' --restart-stage) the old OUT is
     moved aside to OUT.replaced-<UTC time> (never deleted) and the stage starts afresh.
The verdict goes to every rank, so all raise the same error or all go on; nothing has been
written when they refuse. The stage calls `begin()` before its first write: rank 0 records
identity.json and saves config.json then, so a stage that refuses or has nothing to do
never rewrites config.json.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

from dist_sense.comm import get_logger
from dist_sense.formats.identity import differences
from dist_sense.formats.manifest import ManifestError, atomic_write_json, is_finished, read_manifest
from dist_sense.runtime.rundir import RunLock, check_writable

log = get_logger("dist_sense.stages")
IDENTITY_NAME = "identity.json"
IDENTITY_FORMAT = "dist_sense.identity"


class IdentityError(ManifestError):
    """A rerun whose inputs or settings differ from those the stage's existing output was made with."""


class StageRun:
    """What `open_stage` yields: whether OUT already holds work of this identity, and `begin()`."""

    def __init__(self, cfg, stage: str, out_dir: Path, identity: dict, resumed: bool, main: bool):
        self.cfg, self.stage, self.out_dir, self.identity = cfg, stage, out_dir, identity
        self.resumed, self.main = resumed, main

    def begin(self) -> None:
        """Before the stage's first write: record the identity (rank 0) and save the run's config."""
        if not self.main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not self.resumed:
            atomic_write_json(self.out_dir / IDENTITY_NAME, {"format": IDENTITY_FORMAT, "stage": self.stage,
                                                             "identity": self.identity})
            self.resumed = True
        self.cfg.save()


@contextmanager
def open_stage(cfg, stage: str, out_dir: Path, identity: dict, *, restart: bool = False, rank: int = 0,
               share=None):
    """Lock, compare and (with `restart`) move aside; yields a StageRun. See the module docstring.

    share: sends rank 0's value to every rank and returns it (torch broadcast_object or an
    MPI bcast); None in a single process. Every rank must enter, or the others wait in it."""
    identity = json.loads(json.dumps(identity, sort_keys=True, default=str))  # as it will read back
    lock = RunLock(cfg.run_path, out_dir.name, stage) if rank == 0 else None

    def decide() -> bool:
        check_writable(cfg.run_path, f"run_dir of stage {stage}")
        lock.acquire()
        try:
            return _compare(stage, out_dir, identity, restart)
        except BaseException:
            lock.release()
            raise

    resumed = on_rank0(decide, rank, share)
    try:
        yield StageRun(cfg, stage, out_dir, identity, resumed, rank == 0)
    finally:
        if lock is not None:
            lock.release()


def on_rank0(decide, rank: int = 0, share=None):
    """`decide()` on rank 0, its value (or its error, raised alike) on every rank.

    A rank-0-only error must reach the others, or they would wait in `share` for ever; rank 0
    raises the error itself, with its traceback."""
    outcome, error = None, None
    if rank == 0:
        try:
            outcome = {"value": decide()}
        except Exception as err:
            error, outcome = err, {"error": err}
    outcome = (share or (lambda value: value))(outcome)
    if error is not None:
        raise error
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def finished_and_whole(out_dir: Path, fmt: str, version: int, settings: dict, rank: int = 0, share=None) -> bool:
    """Whether a teacher pass's output is finished for `settings` with every shard its manifest lists.

    A shard deleted or cut short after the stage finished (the fix for a damaged shard)
    reopens the stage: rank 0 removes the manifest, so nothing looks complete, and the
    pass runs again; each rank's progress file then redoes the windows of its missing shards."""
    from dist_sense.stages.teacher_pass import missing_shards

    def decide() -> bool:
        if not is_finished(out_dir, fmt, version, settings):
            return False
        missing = missing_shards(out_dir, read_manifest(out_dir, fmt, version))
        if not missing:
            return True
        log.warning("%s: %d shard(s) missing or of the wrong size (%s); the stage is not complete: rebuilding them",
                    out_dir, len(missing), ", ".join(missing[:5]))
        (out_dir / "manifest.json").unlink()
        return False

    return on_rank0(decide, rank, share)


def recorded_identity(out_dir: Path) -> dict | None:
    """OUT/identity.json's identity; None when OUT holds nothing yet; IdentityError when unreadable."""
    path = out_dir / IDENTITY_NAME
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise IdentityError(f"{path}: unreadable ({err}); {_ways_on(out_dir)}") from None
        if not isinstance(data, dict) or data.get("format") != IDENTITY_FORMAT or not isinstance(data.get("identity"), dict):
            raise IdentityError(f"{path}: not a dist_sense identity record; {_ways_on(out_dir)}")
        return data["identity"]
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise IdentityError(f"{out_dir}: holds files but no {IDENTITY_NAME} (made by an older dist_sense, or by hand), "
                            f"so what they were made from is unknown; {_ways_on(out_dir)}")
    return None


def _compare(stage: str, out_dir: Path, identity: dict, restart: bool) -> bool:
    """True: OUT holds work of this identity (resume); False: OUT is new (or was moved aside)."""
    try:
        recorded = recorded_identity(out_dir)
    except IdentityError:
        if not restart:
            raise
        recorded = {"<unknown>": True}
    if recorded is None:
        return False
    changed = differences(recorded, identity)
    if not changed:
        return True
    if restart:
        aside = out_dir.with_name(f"{out_dir.name}.replaced-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        out_dir.rename(aside)
        log.warning("--restart-stage: moved %s aside to %s (%s)", out_dir, aside, "; ".join(changed[:5]))
        return False
    listed = "; ".join(changed[:12]) + (f"; and {len(changed) - 12} more" if len(changed) > 12 else "")
    raise IdentityError(f"{out_dir} was made by {stage} from other inputs or settings ({listed}); "
                        f"{_ways_on(out_dir)}")


def _ways_on(out_dir: Path) -> str:
    return (f"to keep it, use another run_dir; to replace it, rerun with --restart-stage "
            f"(moves {out_dir.name}/ aside to {out_dir.name}.replaced-<time>/)")
