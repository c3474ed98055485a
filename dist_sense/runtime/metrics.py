"""TensorBoard writers (rank 0 only) under RUN/tb/<stage>, and a no-op for other ranks."""
from __future__ import annotations

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


def summary_writer(run_dir: str | Path, stage: str):
    """A SummaryWriter for RUN/tb/<stage> on rank 0; elsewhere one that drops everything."""
    if not comm.detect().is_main:
        return _NullWriter()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(Path(run_dir) / "tb" / stage))
