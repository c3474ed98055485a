"""Real multi-process runs: 2 DeepSpeed ranks (gloo on CPU) and 2 MPI ranks."""
import json

import helpers as testing
import numpy as np
import pytest
import torch
from transformers import AutoModel


@pytest.mark.slow
def test_deepspeed_two_ranks_allreduce_and_zero3_forward_equals_hf(tiny_bert, tmp_path):
    testing.run_deepspeed("tests/scripts/zero3_forward.py", [tiny_bert, tmp_path], nproc=2, timeout=300)
    assert json.loads((tmp_path / "allreduce.json").read_text()) == {"sum": 3.0, "world": 2}

    model = AutoModel.from_pretrained(tiny_bert).eval()
    ids = torch.tensor([[2, 10, 11, 12, 3], [2, 20, 21, 3, 0]])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state.numpy()
    rank0 = np.load(tmp_path / "hidden-rank0.npy")
    rank1 = np.load(tmp_path / "hidden-rank1.npy")
    # Rank 1 had two batches and rank 0 one: rank 0 ran a dummy forward and did not hang.
    assert rank0.shape == (1, 2, 5, 32) and rank1.shape == (2, 2, 5, 32)
    np.testing.assert_allclose(rank0[0], expected, atol=1e-5)
    np.testing.assert_allclose(rank1[1], expected, atol=1e-5)


@pytest.mark.slow
def test_mpirun_two_ranks_allreduce(tmp_path):
    out = tmp_path / "mpi.json"
    testing.run_mpirun("tests/scripts/mpi_allreduce.py", [out], nproc=2, timeout=120)
    result = json.loads(out.read_text())
    assert result["mpi_size"] == 2
    assert result["sum"] == [3.0] * 4
    assert [r["rank"] for r in result["ranks"]] == [0, 1]
    assert all(r["world"] == 2 and r["launcher"] in ("mpich", "openmpi", "pmix") for r in result["ranks"])
