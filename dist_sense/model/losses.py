"""Distillation losses: sense cross-entropy (vectorised) and the MSE baseline.

For every labelled position (target >= 0, token in the dictionary) the student's state h
scores its token's senses C_t (padded to K_max, masked) with the similarity the teacher's
labels were made with: dot C_t . h, cos, or l2 -||h - c||^2 (as the labelling stage scores,
so soft targets and student logits live on one scale). The loss is the
cross-entropy against the teacher's sense (or the KL divergence to the teacher's top-k soft
targets), averaged over the labelled positions of the batch. All positions are handled by one
gather and one batched matmul, in torch on every device (the per-token loop of the reference
code lives in tests/reference_loss.py, to test against).
"""
from __future__ import annotations

import torch

from dist_sense.config import SIMILARITIES

TOP_K_AGREEMENT = 5


def labelled_positions(input_ids, targets, token_to_row):
    """(flat position index [N], dictionary row [N]) of the positions that carry a sense target."""
    ids = input_ids.reshape(-1).long()
    vocab = token_to_row.shape[0]
    rows = token_to_row.index_select(0, ids.clamp(0, vocab - 1))
    rows = torch.where((ids >= 0) & (ids < vocab), rows, torch.full_like(rows, -1))
    keep = (targets.reshape(-1) >= 0) & (rows >= 0)
    index = keep.nonzero(as_tuple=True)[0]
    return index, rows.index_select(0, index)



def sense_table(centres, similarity: str):
    """Senses [T, K, d] transformed once so each similarity is a dot product with `sense_queries`.

    l2: <[2c, -||c||^2], [h, 1]> = -||h - c||^2 + ||h||^2, and ||h||^2 is the same for all of
    a position's senses, so softmax and argmax equal those of -||h - c||^2.
    """
    if similarity == "dot":
        return centres
    if similarity == "cos":
        return centres / centres.float().norm(dim=-1, keepdim=True).clamp_min(1e-12).to(centres.dtype)
    if similarity == "l2":
        return torch.cat([2 * centres, -(centres.float() ** 2).sum(-1, keepdim=True).to(centres.dtype)], dim=-1)
    raise ValueError(f"similarity={similarity!r}: use one of {SIMILARITIES}")


def sense_queries(states, similarity: str):
    """States [N, d] in the form `sense_table` expects for `similarity`."""
    if similarity == "cos":
        return states / states.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if similarity == "l2":
        return torch.cat([states, torch.ones_like(states[:, :1])], dim=-1)
    return states


def sense_logits(states, rows, centres, sense_mask, temperature: float = 1.0):
    """[N, K] logits of N states against their tokens' padded senses; padding is -inf."""
    return _masked_logits(states.float(), _gather_senses(centres, rows), sense_mask.index_select(0, rows), temperature)


def _masked_logits(queries, senses, mask, temperature: float):
    """[N, K] logits of fp32 queries [N, D] against gathered senses [N, K, D]; -inf where `mask` is off."""
    # fp32 logits even when the student runs in bf16: the softmax over close senses needs the precision.
    logits = torch.bmm(queries[:, None, :], senses.transpose(1, 2)).squeeze(1)
    if temperature != 1.0:
        logits.div_(temperature)
    return logits.masked_fill_(~mask, float("-inf"))


class _SenseLoss(torch.autograd.Function):
    """Summed cross-entropy (or KL to soft targets) of the labelled positions against their senses.

    Forward and backward are written out by hand, one node in the autograd graph: at a demo
    micro batch (~140 positions) the arithmetic is a gather and two batched GEMVs, and
    autograd's bookkeeping for the generic version (a dozen small ops, each with its backward
    node) cost more than the arithmetic. With p the target distribution (one-hot for hard
    targets) and q the softmax of the logits, d loss / d logits = q * sum(p) - p; the queries'
    gradient is that times the gathered senses, then through the similarity's query transform
    (`sense_queries`) and scattered back to the positions. Positions are processed `chunk` at a
    time; with more than one chunk the senses are gathered again in backward instead of kept,
    so memory stays bounded by one chunk. Returns (loss, logits); logits are for statistics.
    """

    @staticmethod
    def forward(ctx, flat_states, index, rows, target, centres, sense_mask, soft_ids, soft_probs,
                temperature: float, similarity: str, chunk: int):
        states = flat_states.index_select(0, index).float()
        queries = sense_queries(states, similarity)
        n = index.numel()
        losses, all_logits, all_log_q, all_p, kept = [], [], [], [], None
        for start in range(0, n, chunk):
            part = slice(start, start + chunk)
            senses = _gather_senses(centres, rows[part])  # [n, K, D]: the only tensor that grows with K * D
            logits = _masked_logits(queries[part], senses, sense_mask.index_select(0, rows[part]), temperature)
            log_q = torch.log_softmax(logits, dim=-1)
            if soft_ids is None:
                losses.append(-log_q.gather(1, target[part, None]).sum())
            else:
                p = soft_target_distribution(soft_ids[part], soft_probs[part], logits.shape[1])
                terms = p * (torch.log(p.clamp_min(1e-12)) - log_q)
                losses.append(torch.where(p > 0, terms, torch.zeros_like(terms)).sum())
                all_p.append(p)
            all_logits.append(logits)
            all_log_q.append(log_q)
            kept = senses if chunk >= n else None
        cat = (lambda parts: parts[0] if len(parts) == 1 else torch.cat(parts))
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
        loss = loss.to(torch.promote_types(loss.dtype, flat_states.dtype))  # fp32, or fp64 for fp64 states
        logits, log_q = cat(all_logits), cat(all_log_q)
        p = cat(all_p) if all_p else None
        ctx.save_for_backward(index, rows, target, centres, log_q, p, kept, states)
        ctx.settings = (temperature, similarity, chunk, flat_states.shape, flat_states.dtype)
        ctx.mark_non_differentiable(logits)
        return loss, logits

    @staticmethod
    def backward(ctx, grad_loss, _grad_logits):
        index, rows, target, centres, log_q, p, kept, states = ctx.saved_tensors
        temperature, similarity, chunk, shape, dtype = ctx.settings
        grad = log_q.exp()
        if p is None:
            grad.scatter_add_(1, target[:, None], torch.full_like(grad[:, :1], -1.0))
        else:
            grad = grad * p.sum(-1, keepdim=True) - p
        grad.mul_(grad_loss / temperature)
        parts = []
        for start in range(0, index.numel(), chunk):
            part = slice(start, start + chunk)
            senses = kept if kept is not None else _gather_senses(centres, rows[part])
            parts.append(torch.bmm(grad[part, None, :], senses).squeeze(1))
        grad_queries = parts[0] if len(parts) == 1 else torch.cat(parts)
        grad_states = _query_backward(states, grad_queries, similarity)
        grad_flat = torch.zeros(shape, dtype=dtype, device=grad.device).index_add_(0, index, grad_states.to(dtype))
        return grad_flat, None, None, None, None, None, None, None, None, None, None


def _gather_senses(centres, rows):
    """[N, K, D] fp32 senses of N dictionary rows. index_select, not centres[rows]: advanced
    indexing is several times slower on CPU."""
    return centres.index_select(0, rows).float()


def _query_backward(states, grad_queries, similarity: str):
    """Gradient w.r.t. the states given the gradient w.r.t. `sense_queries(states, similarity)`."""
    if similarity == "l2":
        return grad_queries[:, :-1]
    if similarity == "cos":
        norm = states.norm(dim=-1, keepdim=True)
        unit = states / norm.clamp_min(1e-12)
        radial = (unit * grad_queries).sum(-1, keepdim=True)
        # Below the clamp the query is states / 1e-12, a linear map, so no radial part.
        return torch.where(norm > 1e-12, (grad_queries - unit * radial) / norm.clamp_min(1e-12), grad_queries / 1e-12)
    return grad_queries


def soft_target_distribution(soft_ids, soft_probs, k_max: int):
    """Dense [N, K] teacher distribution from its top-k (ids -1 = unused), renormalised to sum 1."""
    valid = soft_ids >= 0
    probs = torch.where(valid, soft_probs.float(), torch.zeros_like(soft_probs, dtype=torch.float32))
    probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-12)
    dense = torch.zeros(soft_ids.shape[0], k_max, dtype=torch.float32, device=soft_ids.device)
    return dense.scatter_add_(1, soft_ids.clamp_min(0).long(), probs)


def sense_kd_loss(student_states, input_ids, targets, centres, sense_mask, token_to_row,
                  soft_ids=None, soft_probs=None, chunk_positions: int = 0, temperature: float = 1.0,
                  similarity: str = "dot"):
    """(mean loss over labelled positions, stats {correct_top1, correct_top5, n}) for one batch.

    student_states [B, L, d]; input_ids, targets [B, L] (target -1: ignore); centres [T, K, d],
    sense_mask [T, K], token_to_row [V] from SenseDictionary.padded. With soft_ids/soft_probs
    [B, L, k] the loss is KL to the teacher's top-k (student logits / temperature, times
    temperature^2 as in Hinton et al.). chunk_positions > 0 processes that many positions at a
    time and gathers each chunk's senses again in backward, so memory is bounded by one chunk.
    Stats are 0-dim tensors; a batch without labels gives a zero loss that still reaches every
    parameter, so DeepSpeed's backward runs the same on every rank.
    For similarity cos or l2, `centres` must come from `sense_table(centres, similarity)`.
    """
    d = student_states.shape[-1]
    index, rows = labelled_positions(input_ids, targets, token_to_row)
    n = index.numel()
    if n == 0:
        zero = torch.zeros((), dtype=torch.long, device=student_states.device)
        return student_states.sum() * 0.0, {"correct_top1": zero, "correct_top5": zero.clone(), "n": zero.clone()}
    target = targets.reshape(-1).index_select(0, index).long()
    soft_i = soft_p = None
    if soft_ids is not None:
        soft_i = soft_ids.reshape(-1, soft_ids.shape[-1]).index_select(0, index).long()
        soft_p = soft_probs.reshape(-1, soft_probs.shape[-1]).index_select(0, index)
    chunk = chunk_positions if 0 < chunk_positions < n else n
    total, logits = _SenseLoss.apply(student_states.reshape(-1, d), index, rows, target, centres, sense_mask,
                                     soft_i, soft_p, temperature, similarity, chunk)
    if soft_ids is not None:
        total = total * temperature**2
    with torch.no_grad():
        # Rank of the target among its token's senses (ties count in its favour); padded senses
        # are -inf, so a token with fewer than 5 senses always counts as a top-5 hit.
        above = (logits > logits.gather(1, target[:, None])).sum(-1)
        top1, top5 = (above == 0).sum(), (above < TOP_K_AGREEMENT).sum()
    return total / n, {"correct_top1": top1, "correct_top5": top5, "n": torch.tensor(n, device=student_states.device)}


def mse_loss(student_states, teacher_states, mask):
    """Mean squared error over the positions where `mask` is true (mean over the width too)."""
    keep = mask.reshape(-1).bool()
    d = student_states.shape[-1]
    diff = student_states.reshape(-1, d)[keep].float() - teacher_states.reshape(-1, d)[keep].float()
    n = int(keep.sum())
    if n == 0:
        return student_states.sum() * 0.0, {"n": torch.tensor(0)}
    return diff.pow(2).mean(), {"n": torch.tensor(n)}


def positions_per_chunk(k_max: int, d: int, budget_elements: int = 1 << 26) -> int:
    """How many positions to gather at once so the [N, K, d] senses stay under `budget_elements`."""
    return max(1, budget_elements // max(k_max * d, 1))
