import numpy as np
import pytest
import torch

from dist_sense import comm
from dist_sense.runtime import backend


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, (0, 0, 1, "none")),
        ({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}, (3, 1, 4, "torch")),
        ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_SIZE": "8"}, (2, 0, 8, "openmpi")),
        ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"}, (1, 1, 2, "mpich")),
        ({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "6"}, (5, 1, 6, "slurm")),
        # deepspeed inside an srun allocation: the launcher's own variables win.
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4"}, (0, 0, 2, "torch")),
    ],
)
def test_detect_reads_each_launcher(environ, expected):
    env = comm.detect(environ)
    assert (env.rank, env.local_rank, env.world_size, env.launcher) == expected


def test_detect_rejects_inconsistent_rank():
    with pytest.raises(RuntimeError, match="RANK=4 is outside WORLD_SIZE=4"):
        comm.detect({"RANK": "4", "WORLD_SIZE": "4"})


def test_helpers_work_alone_without_launcher():
    # No process group: every collective is the identity for world size 1.
    t = torch.ones(3)
    assert comm.all_reduce_sum(t) is t
    assert comm.all_reduce_max(7) == 7
    assert comm.all_gather_object({"a": 1}) == [{"a": 1}]
    comm.barrier()
    same = np.arange(4.0)
    assert comm.LocalComm().allreduce(same) is same


def test_backend_is_numpy_without_gpu():
    if backend.gpu_count() > 0:
        pytest.skip("a GPU is present: the numpy fallback is not what get_xp returns here")
    xp = backend.get_xp(local_rank=1)
    assert xp is np and backend.name(xp) == "numpy"
    a = np.arange(3)
    assert backend.to_host(a) is a and backend.to_device(a, xp) is a


@pytest.mark.gpu
def test_backend_roundtrip_on_gpu():
    xp = backend.get_xp(0)
    on_gpu = backend.to_device(np.arange(5.0), xp)
    assert backend.name(xp) == "cupy"
    np.testing.assert_array_equal(backend.to_host(on_gpu * 2), np.arange(5.0) * 2)


def test_rank_prefixed_logging(capsys):
    log = comm.get_logger("dist_sense.test")
    log.info("hello")
    assert "[rank 0]" in capsys.readouterr().err
