"""Stopping distill early on SIGTERM: what Slurm sends ahead of the time limit (`--signal`) or on
preemption, and what `scancel` sends.

While `StopOnSignal` is installed, SIGTERM only sets a flag. Every optimizer step reduces each
rank's flag over all ranks together with the step's metrics (no extra collective), so every rank
sees the same answer at the same step, however far apart the signal reached them; the training
loop then saves a checkpoint at that step and the stage exits with STOPPED_EXIT_CODE.
"""
from __future__ import annotations

import signal
import threading

from dist_sense import comm

log = comm.get_logger("dist_sense.distill")

STOPPED_EXIT_CODE = 3
"""Exit code of a distill run stopped by SIGTERM after saving a checkpoint: not finished, resumable
(0: finished; 1: a bug; 2: an input error). A job script can requeue on it."""


class StopOnSignal:
    """Context manager: SIGTERM sets `received` instead of ending the process; the previous handler
    comes back on exit, except after a stop: the launcher may SIGTERM the ranks still shutting down
    when the first one exits (deepspeed's launch.py, srun --kill-on-bad-exit), and that must not turn
    their clean exit into a kill. Outside the main thread (no handlers there) it does nothing."""

    def __init__(self, signum: int = signal.SIGTERM):
        self.signum, self.received, self._previous = signum, False, None

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._handle)
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if isinstance(exc, SystemExit) and exc.code == STOPPED_EXIT_CODE:
            return
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        self.received = True  # only a flag: the handler may run in the middle of anything

    def flag(self) -> float:
        """This rank's vote, summed over ranks with the step's metrics."""
        return 1.0 if self.received else 0.0


def stopped(step: int, ranks_signalled: int) -> SystemExit:
    """Log the stop (the checkpoint of `step` is saved) and return the SystemExit to raise: not an
    Exception, so the entry point passes its code through unchanged."""
    log.warning("stopped by SIGTERM at step %d (received by %d of %d ranks), checkpoint saved; rerun to resume "
                "(exit code %d)", step, ranks_signalled, comm.detect().world_size, STOPPED_EXIT_CODE)
    return SystemExit(STOPPED_EXIT_CODE)
