"""torch.distributed for the teacher passes and the student: NCCL with CUDA, gloo without.

Every function is a no-op (or the identity) in a process that never initialised
torch.distributed, so single-process runs and tests need no launcher.
"""
from __future__ import annotations

import atexit
import os
from datetime import timedelta
from pathlib import Path

from dist_sense.comm import liveness
from dist_sense.comm.env import DistEnv, announce, detect, export_torch_env


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def init_torch(backend: str | None = None, use_deepspeed: bool = True) -> DistEnv:
    """Initialise torch.distributed (NCCL with CUDA, gloo without) once; return the env."""
    env = detect()
    export_torch_env(env)
    import torch
    import torch.distributed as tdist

    if cuda_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    if not tdist.is_initialized():
        backend = backend or ("nccl" if cuda_available() else "gloo")
        # The rendezvous and every collective give up after this, not after torch's 30 minutes.
        timeout = timedelta(seconds=liveness.collective_timeout())
        if use_deepspeed:
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout)
            if not cuda_available():
                atexit.register(remove_own_shm_buffer, env.rank, os.environ["MASTER_PORT"])
        else:
            tdist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, timeout=timeout)
        if backend == "gloo":
            atexit.register(end_gloo_group)
        port = os.environ["MASTER_PORT"]  # export_torch_env set it
        announce(env, backend, f"rendezvous {os.environ['MASTER_ADDR']}:{port}")
        liveness.join(env.rank, env.world_size, broadcast_object, tidy=lambda: remove_own_shm_buffer(env.rank, port))
    return env


def end_gloo_group() -> None:
    """Destroy this process's gloo group at exit, before the interpreter tears down: left alive, its
    threads are still joinable when their destructors run and the process sometimes aborts
    ("terminate called without an active exception", exit -6) after the stage has finished or
    refused with its own exit code. Local to this process: no collective."""
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.destroy_process_group()


def exit_now(code: int) -> None:
    """Leave this process with `code` once its exit handlers have run, skipping the interpreter's teardown.

    For a process that joined torch.distributed: its teardown sometimes aborts in C++
    destructors ("terminate called without an active exception", exit -6) after the work is
    done, even with the group destroyed first by end_gloo_group, which is therefore left out
    (destroying the group is a teardown step of its own). The other handlers (shared-memory
    buffers, logging) run; buffered output is flushed."""
    import sys

    atexit.unregister(end_gloo_group)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def remove_own_shm_buffer(rank: int, port: str) -> None:
    """Unlink this rank's /dev/shm all-reduce buffer of DeepSpeed's CPU backend at exit.

    DeepSpeed 0.19 never unlinks it (about 64 MiB per rank and run), so without this every
    CPU run would leave its buffers in RAM until reboot. Peers keep their own mappings.
    """
    for buffer in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_{rank}"):
        buffer.unlink(missing_ok=True)


def device() -> "torch.device":
    import torch

    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_initialized() -> bool:
    import torch.distributed as tdist

    return tdist.is_available() and tdist.is_initialized()


def barrier() -> None:
    if is_initialized():
        import torch.distributed as tdist

        tdist.barrier()


def all_reduce_sum(tensor):
    """Sum a torch tensor over ranks in place (a no-op with one process); returns it."""
    if is_initialized():
        import torch.distributed as tdist

        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def all_reduce_max(value: int) -> int:
    """Largest integer over ranks (used so ranks agree on a batch count)."""
    if not is_initialized():
        return int(value)
    import torch
    import torch.distributed as tdist

    t = torch.tensor([int(value)], dtype=torch.int64, device=device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return int(t.item())


def all_gather_object(obj) -> list:
    if not is_initialized():
        return [obj]
    import torch.distributed as tdist

    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_initialized():
        return obj
    import torch.distributed as tdist

    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]
