"""Settings that change the whole process, applied once by the entry point (dist_sense.cli),
never from inside a library call."""
from __future__ import annotations

import ctypes
import os
import signal
import threading


def share_cores(local_processes: int) -> None:
    """Give each of `local_processes` CPU ranks on one node its share of the cores.

    torch starts one thread per core in every process; with several ranks per node that
    oversubscribes the cores and every rank gets slower. Left alone when OMP_NUM_THREADS
    is set or CUDA is present (the GPU does the work there).
    """
    if "OMP_NUM_THREADS" in os.environ or local_processes <= 1:
        return  # before importing torch: a lone process need not pay for it here
    import torch

    if torch.cuda.is_available():
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_processes))


def retain_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Ask glibc to keep freed host memory for reuse instead of returning it to the OS.

    The k-means loop allocates the same large arrays (gathered rows, distance blocks) tile
    after tile. By default glibc maps every block over 128 KiB (adaptively up to 32 MiB)
    freshly and unmaps it on free, so each reuse pays a page fault per 4 KiB (its measured
    share of the k-means time is in docs/benchmarks.md). Blocks up to `mmap_threshold`
    then come from the heap, which keeps up to `trim_threshold` bytes of freed memory.
    Returns False where this is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers
    return bool(libc.mallopt(m_mmap_threshold, mmap_threshold)) and bool(libc.mallopt(m_trim_threshold, trim_threshold))


class Terminated(BaseException):
    """SIGTERM arrived in a stage without a checkpointing handler of its own (all but distill).

    A BaseException, so no `except Exception` on the way swallows it: `finally` blocks still run
    (the stage's lock is released, a half-written shard keeps its temporary name) and the entry
    point turns it into exit code 3, as for a stopped distill: resumable, rerun the same command."""


def terminate_on_sigterm() -> None:
    """SIGTERM raises Terminated in the main thread instead of ending the process on the spot."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handle(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
        raise Terminated()

    signal.signal(signal.SIGTERM, handle)
