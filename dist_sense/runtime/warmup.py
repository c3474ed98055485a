"""Build DeepSpeed's CPU shared-memory communication op once, at install time, into TORCH_EXTENSIONS_DIR.

On CPU DeepSpeed compiles this op at its first `init_distributed` (about 40 s on 2 cores).
`make install` runs this module so that the tests and the stages load the cached build
instead of each paying for it. On a GPU accelerator there is nothing to prebuild.
"""
from __future__ import annotations

import os
import time


def main() -> None:
    if os.environ.get("DS_ACCELERATOR", "cpu") != "cpu":
        print("warmup: GPU accelerator, nothing to prebuild")
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    start = time.time()
    from deepspeed.comm.torch import build_shm_op

    op = build_shm_op()
    where = os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions")
    state = "ready" if op is not None else "not available on this CPU (DeepSpeed falls back to torch collectives)"
    print(f"warmup: DeepSpeed shm comm op {state} in {time.time() - start:.0f}s, cached in {where}")


if __name__ == "__main__":
    main()
