"""The compiled sense loss (fused_loss) against the batched torch one, its build cache and its fallback.

tests/test_losses.py runs every loss test on both implementations; these compare them directly.
"""
import pytest
import torch
from test_losses import grad_of, make_batch, make_senses

from dist_sense.model import fused_loss
from dist_sense.model.losses import sense_kd_loss, sense_table

pytestmark = pytest.mark.skipif(not fused_loss.usable(torch.zeros(1), torch.zeros(1), None),
                                reason=f"the fused kernel did not build here: {fused_loss.unavailable_reason()}")


@pytest.fixture
def senses():
    return make_senses()


@pytest.mark.parametrize("similarity", ["dot", "l2", "cos"])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_equals_torch_loss(senses, similarity, soft, dtype):
    """The kernel against the batched torch version: value, gradient and agreement counts."""
    centres, mask, token_to_row = senses
    states, ids, targets = make_batch(senses, batch=4, length=13, seed=9)
    states = states.detach().to(dtype).requires_grad_(True)
    table = sense_table(centres, similarity).to(dtype)
    extra = {}
    if soft:
        gen = torch.Generator().manual_seed(4)
        extra = {"soft_ids": torch.randint(-1, 2, (*ids.shape, 3), generator=gen),
                 "soft_probs": torch.rand(*ids.shape, 3, generator=gen), "temperature": 1.5}
    results = {}
    for name in ("torch", "fused"):
        loss, stats = sense_kd_loss(states, ids, targets, table, mask, token_to_row, similarity=similarity,
                                    implementation=name, **extra)
        results[name] = (loss, grad_of(loss * 3.0, states), {k: int(v) for k, v in stats.items()})
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(results["fused"][0], results["torch"][0], **tolerance)
    torch.testing.assert_close(results["fused"][1], results["torch"][1], **tolerance)
    assert results["fused"][2] == results["torch"][2] and results["fused"][2]["n"] > 10


def test_kernel_names_a_target_beyond_the_senses(senses):
    states, ids, targets = make_batch(senses)
    labelled = torch.nonzero(targets.reshape(-1) >= 0)[0, 0]
    targets.reshape(-1)[labelled] = 99
    with pytest.raises(ValueError, match=f"target 99 at flat position {int(labelled)}"):
        sense_kd_loss(states, ids, targets, *senses)


def test_implementation_is_checked(senses):
    states, ids, targets = make_batch(senses)
    with pytest.raises(ValueError, match="implementation='nope'"):
        sense_kd_loss(states, ids, targets, *senses, implementation="nope")
    with pytest.raises(ValueError, match="cannot run here"):  # mixed precision is torch-only
        sense_kd_loss(states.float(), ids, targets, *senses, implementation="fused")


def test_build_is_cached_by_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    first = fused_loss.build()
    assert first.parent == tmp_path / "dist_sense_kernels" and first.stat().st_size > 0
    stamp = first.stat().st_mtime_ns
    assert fused_loss.build() == first and first.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no partial files left behind


def test_failed_build_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="no-such-cc"):
        fused_loss.build(compiler=str(tmp_path / "no-such-cc"))
    assert not list((tmp_path / "dist_sense_kernels").glob("*.so"))


def test_without_the_kernel_auto_falls_back_to_torch(senses, monkeypatch):
    monkeypatch.setattr(fused_loss, "_library", None)
    monkeypatch.setattr(fused_loss, "_unavailable", "no compiler (simulated)")
    states, ids, targets = make_batch(senses)
    loss, _ = sense_kd_loss(states, ids, targets, *senses, implementation="auto")
    expected, _ = sense_kd_loss(states, ids, targets, *senses, implementation="torch")
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="no compiler"):
        sense_kd_loss(states, ids, targets, *senses, implementation="fused")
