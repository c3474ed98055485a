"""The communication layer: every rank variable and every collective goes through here.

- `env`: reads the launcher's variables (the only module that does).
- `torch_dist`: torch.distributed for the teacher passes and the student (DeepSpeed on top).
- `mpi`: the `Comm` interface (LocalComm, MpiComm) of host-array collectives and the shared
  work counter, used by build_dict; the k-means maths takes a Comm and never imports MPI.

The names below are the layer's interface; stages use them as `comm.detect()`,
`comm.init_torch()`, `comm.open_comm()`.
"""
from dist_sense.comm.env import DistEnv, detect, export_torch_env, free_port, get_logger, local_world_size
from dist_sense.comm.mpi import LocalComm, MpiComm, SharedCounter, abort_world, open_comm
from dist_sense.comm.torch_dist import (
                                        all_gather_object,
                                        all_reduce_max,
                                        all_reduce_sum,
                                        barrier,
                                        broadcast_object,
                                        cuda_available,
                                        device,
                                        init_torch,
                                        is_initialized,
                                        remove_own_shm_buffer,
)

__all__ = [
    "DistEnv", "detect", "export_torch_env", "free_port", "get_logger", "local_world_size",
    "LocalComm", "MpiComm", "SharedCounter", "abort_world", "open_comm",
    "all_gather_object", "all_reduce_max", "all_reduce_sum", "barrier", "broadcast_object", "cuda_available",
    "device", "init_torch", "is_initialized", "remove_own_shm_buffer",
]
