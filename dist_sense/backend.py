"""The `xp` switch: cupy where this rank has a usable GPU, numpy otherwise.

`import cupy` succeeds on machines without a GPU and fails only at the first array,
so usability is decided by asking the CUDA runtime for devices. All host/device
copies go through `to_host` / `to_device` so the rest of the code never branches.
"""
from __future__ import annotations

import functools
import os

import numpy as np


@functools.lru_cache(maxsize=1)
def gpu_count() -> int:
    """Number of CUDA devices cupy can use (0 if cupy or a GPU is missing)."""
    if os.environ.get("DIST_SENSE_FORCE_NUMPY") == "1":
        return 0
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no cupy, no driver, no device: all mean "numpy"
        return 0


def get_xp(local_rank: int = 0):
    """cupy bound to GPU `local_rank % n_gpus` when one is usable, else numpy."""
    n = gpu_count()
    if n == 0:
        return np
    import cupy

    cupy.cuda.Device(local_rank % n).use()
    return cupy


def name(xp) -> str:
    return "cupy" if xp is not np else "numpy"


def to_host(array) -> np.ndarray:
    """A numpy array, copying from the GPU if needed."""
    if isinstance(array, np.ndarray):
        return array
    if hasattr(array, "get"):
        return array.get()
    return np.asarray(array)


def array_module(array):
    """numpy or cupy: the module whose array `array` is."""
    if isinstance(array, np.ndarray):
        return np
    import cupy

    return cupy.get_array_module(array)


def to_device(array, xp):
    """`array` as an `xp` array (a no-op when it already is one)."""
    if xp is np:
        return to_host(array)
    return xp.asarray(array)


def synchronize(xp) -> None:
    """Wait for queued GPU work (for honest timings); nothing to do on numpy."""
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def retain_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Ask glibc to keep freed host memory for reuse instead of returning it to the OS.

    The k-means loop allocates the same large arrays (gathered rows, [t, n, K] products)
    tile after tile. By default glibc maps every block over 128 KiB (adaptively up to
    32 MiB) freshly and unmaps it on free, so each reuse pays a page fault per 4 KiB; on
    the 2-core VM of docs/benchmarks.md that was about a third of the k-means time. Blocks
    up to `mmap_threshold` then come from the heap, which keeps up to `trim_threshold`
    bytes of freed memory. Returns False where this is not glibc.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers
    return bool(libc.mallopt(m_mmap_threshold, mmap_threshold)) and bool(libc.mallopt(m_trim_threshold, trim_threshold))
