"""Command-line parsing shared by every launcher: `--config FILE [key=value ...]`.

`deepspeed` appends `--local_rank=N`; it is accepted and ignored here because
dist.detect() reads the same from the environment.
"""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, RunConfig, describe


def user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by input or config: printed as one line, not as a traceback."""
    from .corpus import CorpusError
    from .dictionary import DictionaryError
    from .manifest import ManifestError
    from .shards import ShardError
    from .teacher import TeacherError

    return ConfigError, CorpusError, DictionaryError, ManifestError, ShardError, TeacherError


def run_stage(description: str, stage_run, argv: list[str] | None = None):
    """Parse the command line, run `stage_run(cfg)`, print its output directory.

    A bad input ends the process with exit code 2 and one line naming what is wrong.
    """
    cfg = parse_run_config(description, argv)
    try:
        out = stage_run(cfg)
    except user_errors() as err:
        from .dist import detect

        print(f"error [rank {detect().rank}]: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    print(out)
    return out


def parse_run_config(description: str, argv: list[str] | None = None) -> RunConfig:
    parser = argparse.ArgumentParser(
        description=description,
        epilog="Any config key can be overridden as key=value (sections dotted, e.g. kmeans.k=10). "
        "--list-keys prints every key with its default and meaning.",
    )
    parser.add_argument("--config", help="run config JSON (default: RUN/config.json of run_dir=RUN when it exists)")
    parser.add_argument("--list-keys", action="store_true", help="print every config key and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deepspeed", help="DeepSpeed engine JSON (sets distill.ds_config)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.list_keys:
        print(describe())
        raise SystemExit(0)
    overrides = list(args.overrides)
    if args.deepspeed:
        overrides.append(f"distill.ds_config={args.deepspeed}")
    config = args.config or _saved_run_config(overrides)
    try:
        return RunConfig.load(config, overrides)
    except ConfigError as err:
        parser.exit(2, f"config error: {err}\n")


def _saved_run_config(overrides: list[str]) -> str | None:
    """RUN/config.json when `run_dir=RUN` is given without --config: a later stage reuses the run's config."""
    from pathlib import Path

    for item in overrides:
        if item.startswith("run_dir="):
            saved = Path(item.split("=", 1)[1]) / "config.json"
            return str(saved) if saved.is_file() else None
    return None
