"""TensorBoard writers (rank 0 only) under RUN/tb/<stage>, a no-op for other ranks, and the
per-step log of the training stages (metrics.jsonl, TensorBoard, progress bar)."""
from __future__ import annotations

import json
import math
import weakref
from pathlib import Path

from dist_sense import comm


class _NullWriter:
    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def add_histogram(self, *args, **kwargs) -> None:
        pass

    def add_text(self, *args, **kwargs) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


_WRITERS: list = []
"""Weak references to the writers summary_writer made, for close_writers."""


def summary_writer(run_dir: str | Path, stage: str):
    """A SummaryWriter for RUN/tb/<stage> on rank 0; elsewhere one that drops everything."""
    if not comm.detect().is_main:
        return _NullWriter()
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb" / stage))
    _WRITERS.append(weakref.ref(writer))
    return writer


def close_writers() -> None:
    """Flush and close every writer summary_writer made that is still open (closing twice is harmless).

    For a process about to leave without the interpreter's teardown (cli._leave), which is
    what would otherwise flush a writer nobody closed."""
    for ref in _WRITERS:
        writer = ref()
        if writer is not None:
            writer.close()
    _WRITERS.clear()


class StepLog:
    """Rank 0's JSON lines (one object a step or evaluation), TensorBoard scalars and progress bar
    of a training stage (distill, finetune); no-ops on other ranks.

    On a resume from `start_step`, lines past it are dropped: those steps were never committed
    to a checkpoint (nor a line cut short by a kill), and the rerun writes them again."""

    def __init__(self, path: Path, run_dir: Path, tb_name: str, steps: int, start_step: int, desc: str):
        from tqdm import tqdm

        self.main = comm.detect().is_main
        self.path = Path(path)
        self.tb = summary_writer(run_dir, tb_name)
        self.bar = tqdm(total=steps, initial=start_step, unit="step", desc=desc, disable=not self.main)
        if self.main and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, values: dict) -> None:
        if not self.main:
            return
        for tag, value in values.items():
            self.tb.add_scalar(tag, value, step)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")

    def step_done(self, **postfix: str) -> None:
        self.bar.update(1)
        self.bar.set_postfix(**postfix)

    def close(self) -> None:
        self.bar.close()
        self.tb.close()


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf
