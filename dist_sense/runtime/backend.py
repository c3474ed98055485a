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
