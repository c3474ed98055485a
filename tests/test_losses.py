"""The vectorised sense loss against the per-token reference loop, chunking, soft targets, MSE."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference_loss import reference_loop_loss

from dist_sense.model.losses import mse_loss, positions_per_chunk, sense_kd_loss

VOCAB, D = 20, 8


def make_senses(seed=0):
    """Tokens 3..14 have 1-4 senses each; the others have no dictionary entry."""
    gen = torch.Generator().manual_seed(seed)
    tokens = list(range(3, 15))
    counts = [1 + (t % 4) for t in tokens]
    centres = torch.zeros(len(tokens), max(counts), D, dtype=torch.float64)
    mask = torch.zeros(len(tokens), max(counts), dtype=torch.bool)
    for row, k in enumerate(counts):
        centres[row, :k] = torch.randn(k, D, generator=gen, dtype=torch.float64)
        mask[row, :k] = True
    token_to_row = torch.full((VOCAB,), -1, dtype=torch.long)
    token_to_row[tokens] = torch.arange(len(tokens))
    return centres, mask, token_to_row


def make_batch(centres_mask_rows, batch=3, length=9, seed=1):
    _, mask, token_to_row = centres_mask_rows
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=gen)
    targets = torch.full_like(ids, -1)
    for b in range(batch):
        for pos in range(length):
            row = int(token_to_row[ids[b, pos]])
            if row >= 0 and torch.rand((), generator=gen) < 0.8:
                targets[b, pos] = int(torch.randint(0, int(mask[row].sum()), (), generator=gen))
    states = torch.randn(batch, length, D, generator=gen, dtype=torch.float64, requires_grad=True)
    return states, ids, targets


@pytest.fixture
def senses():
    return make_senses()


def grad_of(loss, states):
    (grad,) = torch.autograd.grad(loss, states)
    return grad


def test_vectorised_equals_reference_loop_in_value_and_gradient(senses):
    states, ids, targets = make_batch(senses)
    assert (targets >= 0).sum() > 5 and ((targets < 0) & (senses[2][ids] >= 0)).any()
    fast, stats = sense_kd_loss(states, ids, targets, *senses)
    slow = reference_loop_loss(states, ids, targets, *senses)
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(grad_of(fast, states), grad_of(slow, states))
    assert int(stats["n"]) == int((targets >= 0).sum())


def test_chunked_equals_unchunked(senses):
    states, ids, targets = make_batch(senses, batch=4, length=11)
    whole, stats = sense_kd_loss(states, ids, targets, *senses)
    chunked, chunk_stats = sense_kd_loss(states, ids, targets, *senses, chunk_positions=3)
    torch.testing.assert_close(whole, chunked)
    torch.testing.assert_close(grad_of(whole, states), grad_of(chunked, states))
    assert {k: int(v) for k, v in stats.items()} == {k: int(v) for k, v in chunk_stats.items()}


def test_ignored_positions_and_tokens_without_senses_do_not_contribute(senses):
    states, ids, targets = make_batch(senses)
    ids[0, 0], targets[0, 0] = 0, 1  # token 0 has no entry: its target must be ignored
    ids[0, 1] = 16  # no entry either
    ignored = (targets < 0) | (senses[2][ids] < 0)
    loss, _ = sense_kd_loss(states, ids, targets, *senses)
    grad = grad_of(loss, states)
    assert torch.all(grad[ignored] == 0) and grad[~ignored].abs().sum() > 0
    moved = states.detach().clone()
    moved[ignored] += 100.0
    torch.testing.assert_close(sense_kd_loss(moved, ids, targets, *senses)[0], loss.detach())


def test_batch_without_labels_gives_zero_loss_that_backpropagates(senses):
    states, ids, _ = make_batch(senses)
    loss, stats = sense_kd_loss(states, ids, torch.full_like(ids, -1), *senses)
    assert float(loss.detach()) == 0.0 and int(stats["n"]) == 0
    assert torch.all(grad_of(loss, states) == 0)


def test_agreement_counts(senses):
    centres, mask, token_to_row = senses
    states, ids, targets = make_batch(senses, batch=4, length=12)
    _, stats = sense_kd_loss(states, ids, targets, *senses)
    top1 = top5 = 0
    for b, pos in zip(*torch.nonzero(targets >= 0, as_tuple=True)):
        row = token_to_row[ids[b, pos]]
        scores = centres[row][mask[row]] @ states[b, pos].detach()
        order = torch.argsort(scores, descending=True).tolist()
        top1 += order[0] == targets[b, pos]
        top5 += int(targets[b, pos]) in order[:5]
    assert int(stats["correct_top1"]) == top1 and int(stats["correct_top5"]) == top5


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_soft_target_kl_equals_hand_computation(senses, temperature):
    centres, mask, token_to_row = senses
    ids = torch.tensor([[7, 8, 0]])  # 4 senses, 1 sense, no entry
    targets = torch.tensor([[2, 0, -1]])
    states = torch.randn(1, 3, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    soft_ids = torch.tensor([[[2, 0], [0, -1], [-1, -1]]])
    soft_probs = torch.tensor([[[0.6, 0.2], [1.0, 0.0], [0.0, 0.0]]])
    loss, stats = sense_kd_loss(states, ids, targets, *senses, soft_ids=soft_ids, soft_probs=soft_probs,
                                temperature=temperature)
    # By hand: token 7 keeps its top 2 renormalised to (0.75, 0.25); token 8's single sense gives KL 0.
    row = int(token_to_row[7])
    logits = (centres[row][mask[row]] @ states[0, 0].detach()) / temperature
    log_q = F.log_softmax(logits, dim=0).numpy()
    p = np.array([0.75, 0.25])
    kl = float(np.sum(p * (np.log(p) - log_q[[2, 0]])))
    expected = kl * temperature**2 / 2  # mean over the two labelled positions
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)  # logits are computed in fp32
    assert int(stats["n"]) == 2


def test_mse_loss_over_masked_positions():
    student = torch.randn(2, 4, D)
    teacher = torch.randn(2, 4, D)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    loss, stats = mse_loss(student, teacher, mask)
    keep = mask.bool()
    torch.testing.assert_close(loss, ((student[keep] - teacher[keep]) ** 2).mean())
    assert int(stats["n"]) == 3


def test_positions_per_chunk_bounds_the_gather():
    assert positions_per_chunk(20, 4096, budget_elements=1 << 26) == (1 << 26) // (20 * 4096)
    assert positions_per_chunk(10**6, 10**6) == 1


def test_two_tokens_with_known_senses_equal_the_hand_computed_loss():
    # Token 1 has senses (1, 0) and (0, 1); token 2 has one sense, (2, 0), padded to K = 2.
    centres = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True], [True, False]])
    token_to_row = torch.tensor([-1, 0, 1])
    states = torch.tensor([[[1.0, 2.0], [0.5, 3.0], [9.0, 9.0]]], requires_grad=True)
    input_ids = torch.tensor([[1, 2, 0]])  # token 0 has no senses: ignored
    targets = torch.tensor([[1, 0, 0]])
    loss, stats = sense_kd_loss(states, input_ids, targets, centres, mask, token_to_row)
    # Token 1: logits (1, 2), target 1 -> -log(e^2 / (e^1 + e^2)) = log(1 + e^-1); token 2: one sense -> 0.
    expected = math.log(1 + math.exp(-1)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert int(stats["n"]) == 2 and int(stats["correct_top1"]) == 2


@pytest.mark.parametrize("similarity", ["l2", "cos"])
def test_other_similarities_score_like_the_labelling_stage(senses, similarity):
    """l2: logits -||h - c||^2; cos: the cosine; both as the label stage scores the teacher."""
    from dist_sense.model.losses import sense_table

    centres, mask, token_to_row = senses
    states, ids, targets = make_batch(senses)
    loss, stats = sense_kd_loss(states, ids, targets, sense_table(centres, similarity), mask, token_to_row,
                                similarity=similarity)
    total, n = 0.0, 0
    for b, pos in zip(*torch.nonzero(targets >= 0, as_tuple=True)):
        row = int(token_to_row[ids[b, pos]])
        c, h = centres[row][mask[row]], states[b, pos]
        logits = -((c - h) ** 2).sum(-1) if similarity == "l2" else F.cosine_similarity(c, h[None], dim=-1)
        total = total - F.log_softmax(logits, -1)[targets[b, pos]]
        n += 1
    torch.testing.assert_close(loss, total / n)
    torch.testing.assert_close(grad_of(loss, states), grad_of(total / n, states))  # the hand-written backward
    assert int(stats["n"]) == n


def autograd_kl(states, ids, targets, centres, mask, token_to_row, soft_ids, soft_probs, temperature):
    """Mean KL(p || softmax(C_t h / T)) * T^2 over the labelled positions, one position at a time."""
    total, n = 0.0, 0
    for b, pos in zip(*torch.nonzero(targets >= 0, as_tuple=True)):
        row = int(token_to_row[ids[b, pos]])
        log_q = F.log_softmax(centres[row][mask[row]] @ states[b, pos] / temperature, -1)
        valid = soft_ids[b, pos] >= 0
        p = soft_probs[b, pos][valid].double()
        p = p / p.sum()
        total = total + (p * (p.log() - log_q[soft_ids[b, pos][valid]])).sum() * temperature**2
        n += 1
    return total / n


@pytest.mark.parametrize("chunk", [0, 4])
def test_soft_target_gradient_equals_autograd(senses, chunk):
    centres, mask, token_to_row = senses
    states, ids, targets = make_batch(senses, batch=3, length=9, seed=5)
    gen = torch.Generator().manual_seed(6)
    k = 3
    counts = mask.sum(-1)[token_to_row[ids].clamp_min(0)]
    # Distinct ids per position, the target's first: the target, the next sense, ... (-1 past the count).
    step = torch.arange(k)
    soft_ids = torch.where(step < counts[..., None], (targets.clamp_min(0)[..., None] + step) % counts[..., None].clamp_min(1), -1)
    soft_probs = torch.rand(*ids.shape, k, generator=gen)
    loss, _ = sense_kd_loss(states, ids, targets, *senses, soft_ids=soft_ids, soft_probs=soft_probs,
                            temperature=2.0, chunk_positions=chunk)
    expected = autograd_kl(states, ids, targets, *senses, soft_ids, soft_probs, 2.0)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad_of(loss, states), grad_of(expected, states))


@pytest.mark.parametrize("similarity", ["l2", "cos"])
def test_chunked_equals_unchunked_for_other_similarities(senses, similarity):
    from dist_sense.model.losses import sense_table

    centres, mask, token_to_row = senses
    states, ids, targets = make_batch(senses, batch=4, length=11)
    table = sense_table(centres, similarity)
    whole, _ = sense_kd_loss(states, ids, targets, table, mask, token_to_row, similarity=similarity)
    chunked, _ = sense_kd_loss(states, ids, targets, table, mask, token_to_row, similarity=similarity,
                               chunk_positions=5)
    torch.testing.assert_close(whole, chunked)
    torch.testing.assert_close(grad_of(whole, states), grad_of(chunked, states))

