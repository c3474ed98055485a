"""The one command-line entry of every launcher: `--config FILE [key=value ...]`, then the stage.

`run_stage` parses the command line, applies the process-wide settings, runs the stage
and turns errors into exit codes: a bad input (config, corpus, manifest, shard, dictionary,
labels, teacher, run directory, and a full, read-only or forbidden filesystem) is one line
naming the culprit and exit code 2; anything else is a bug and keeps its traceback (exit
code 1); SIGTERM is exit code 3 (resumable: distill saves a checkpoint first, the other
stages keep what they finished); a peer rank lost (its node gone, comm/liveness.py) is exit
code 4, resumable once the node is back. Under MPI a failing rank ends the whole job, since its
peers may be waiting for it in a collective. `--restart-stage` moves aside a stage's output
made from other inputs or settings instead of refusing it (stages/guard.py).

`deepspeed` appends `--local_rank=N`; it is accepted and ignored here because
comm.detect() reads the same from the environment.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from dist_sense.config import ConfigError, RunConfig, describe

STOPPED_EXIT_CODE = 3
"""Exit code of a stage stopped by SIGTERM (distill after its checkpoint): resumable, not an error."""


def user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by input or config: printed as one line, not as a traceback."""
    from dist_sense.comm.liveness import TimeoutSettingError
    from dist_sense.formats.corpus import CorpusError
    from dist_sense.formats.dictionary import DictionaryError
    from dist_sense.formats.manifest import ManifestError
    from dist_sense.formats.shards import ShardError
    from dist_sense.model.teacher import TeacherError
    from dist_sense.runtime.rundir import RunDirError

    # Labels, checkpoint, identity and evaluation errors are ManifestErrors.
    return (ConfigError, CorpusError, DictionaryError, ManifestError, ShardError, TeacherError, RunDirError,
            TimeoutSettingError)


def disk_error(err: BaseException, cfg: RunConfig):
    """A full, read-only or forbidden filesystem as an input error naming the path; None for other errors."""
    if not isinstance(err, OSError):
        return None
    from dist_sense.runtime.rundir import describe_os_error

    return describe_os_error(err, cfg.run_path)


def run_stage(description: str, stage_run, argv: list[str] | None = None, mpi: bool = False,
              engine_key: str = "distill.ds_config", stage: str | None = None):
    """Parse the command line, run `stage_run(cfg)`, print its output directory.

    mpi: the stage's ranks talk over MPI (build_dict): they reuse freed memory for the
    tile loop's large arrays, and a failing rank aborts the MPI job.
    engine_key: the config key `--deepspeed FILE` sets (the stage's own DeepSpeed JSON).
    stage: the name of the stage's heartbeat folder, RUN/liveness/<stage> (default: the launcher's file name).
    """
    from dist_sense import comm
    from dist_sense.comm import liveness
    from dist_sense.runtime import process

    cfg, restart = parse_run_config(description, argv, engine_key)
    env = comm.detect()
    process.share_cores(comm.local_world_size())
    process.terminate_on_sigterm()
    if mpi:
        process.retain_freed_memory()
    liveness.configure(cfg.run_path, stage or Path(sys.argv[0]).stem)
    try:
        liveness.peer_timeout(), liveness.collective_timeout()  # a bad setting is refused before any work
        out = stage_run(cfg, restart=True) if restart else stage_run(cfg)
    except process.Terminated:
        print(f"stopped [rank {env.rank}]: SIGTERM; what was finished is kept, rerun the same command to resume",
              file=sys.stderr, flush=True)
        _end_job(mpi and env.world_size > 1, STOPPED_EXIT_CODE)
        _leave(STOPPED_EXIT_CODE)
        raise SystemExit(STOPPED_EXIT_CODE) from None
    except Exception as err:
        one_line = err if isinstance(err, user_errors()) else disk_error(err, cfg)
        if one_line is None:
            print(f"error [rank {env.rank}]: a bug, not an input error:", file=sys.stderr, flush=True)
            traceback.print_exc()
            sys.stderr.flush()
            _end_job(mpi and env.world_size > 1, 1)
            _leave(1)
            raise
        print(f"error [rank {env.rank}]: {one_line}", file=sys.stderr, flush=True)
        _end_job(mpi and env.world_size > 1, 2)
        _leave(2)
        raise SystemExit(2) from None
    if env.rank == 0 or not mpi:
        print(out)
    _leave(0)
    return out


def _leave(code: int) -> None:
    """End a process that joined torch.distributed now, with `code` (torch_dist.exit_now: its interpreter
    teardown sometimes aborts, seen from extract and distill ranks under DeepSpeed's launcher,
    which then reports the job failed). TensorBoard writers still open are closed first, since
    that teardown is what would flush them. A process that never joined torch.distributed
    (tests calling run_stage, build_dict on MPI) returns as usual."""
    from dist_sense.comm import liveness, torch_dist
    from dist_sense.runtime import metrics

    liveness.leave(code)
    if torch_dist.is_initialized():
        metrics.close_writers()
        torch_dist.exit_now(code)


def _end_job(abort_mpi: bool, code: int) -> None:
    from dist_sense.comm import liveness

    liveness.leave(code)
    if abort_mpi:
        from dist_sense.comm import abort_world

        abort_world(code)


def parse_run_config(description: str, argv: list[str] | None = None,
                     engine_key: str = "distill.ds_config") -> tuple[RunConfig, bool]:
    """(the run config, whether --restart-stage was given)."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog="Any config key can be overridden as key=value (sections dotted, e.g. kmeans.k=10). "
        "--list-keys prints every key with its default and meaning.",
    )
    parser.add_argument("--config", help="run config JSON (default: RUN/config.json of run_dir=RUN when it exists)")
    parser.add_argument("--list-keys", action="store_true", help="print every config key and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deepspeed", help="DeepSpeed engine JSON (sets distill.ds_config; finetune.ds_config for finetune)")
    parser.add_argument("--restart-stage", action="store_true",
                        help="when this stage's output was made from other inputs or settings, move it aside "
                             "(OUT.replaced-<time>) and start the stage afresh, instead of refusing")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.list_keys:
        print(describe())
        raise SystemExit(0)
    overrides = list(args.overrides)
    if args.deepspeed:
        overrides.append(f"{engine_key}={args.deepspeed}")
    config = args.config or _saved_run_config(overrides)
    try:
        return RunConfig.load(config, overrides), args.restart_stage
    except ConfigError as err:
        parser.exit(2, f"config error: {err}\n")


def _saved_run_config(overrides: list[str]) -> str | None:
    """RUN/config.json when `run_dir=RUN` is given without --config: a later stage reuses the run's config."""
    for item in overrides:
        if item.startswith("run_dir="):
            saved = Path(item.split("=", 1)[1]) / "config.json"
            return str(saved) if saved.is_file() else None
    return None
