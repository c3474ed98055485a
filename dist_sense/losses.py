"""Distillation losses: sense cross-entropy (vectorised), the MSE baseline, and the slow reference.

For every labelled position (target >= 0, token in the dictionary) the student's state h
scores its token's senses C_t (padded to K_max, masked) with the similarity the teacher's
labels were made with: dot C_t . h, cos, or l2 -||h - c||^2 (as the labelling stage scores,
so soft targets and student logits live on one scale). The loss is the
cross-entropy against the teacher's sense (or the KL divergence to the teacher's top-k soft
targets), averaged over the labelled positions of the batch. All positions are handled by one
gather and one batched matmul; `reference_loop_loss` is the per-token Python loop of the
reference code, kept only to test against and to benchmark.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

TOP_K_AGREEMENT = 5


def labelled_positions(input_ids, targets, token_to_row):
    """(flat position index [N], dictionary row [N]) of the positions that carry a sense target."""
    ids = input_ids.reshape(-1).long()
    vocab = token_to_row.shape[0]
    rows = token_to_row[ids.clamp(0, vocab - 1)]
    rows = torch.where((ids >= 0) & (ids < vocab), rows, torch.full_like(rows, -1))
    keep = (targets.reshape(-1) >= 0) & (rows >= 0)
    index = keep.nonzero(as_tuple=True)[0]
    return index, rows[index]


SIMILARITIES = ("dot", "cos", "l2")


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
    senses = centres[rows].float()  # [N, K, d]: the only tensor that grows with K * d
    # fp32 logits even when the student runs in bf16: the softmax over close senses needs the precision.
    logits = torch.einsum("nkd,nd->nk", senses, states.float()) / temperature
    return logits.masked_fill(~sense_mask[rows], float("-inf"))


def _chunk_terms(states, rows, targets, centres, sense_mask, soft_ids, soft_probs, temperature):
    """Summed loss, top-1 and top-5 hits of one chunk of positions."""
    logits = sense_logits(states, rows, centres, sense_mask, temperature)
    log_q = F.log_softmax(logits, dim=-1)
    if soft_ids is None:
        loss = F.nll_loss(log_q, targets, reduction="sum")
    else:
        loss = soft_kl_sum(log_q, soft_ids, soft_probs) * temperature**2
    with torch.no_grad():
        k = min(TOP_K_AGREEMENT, logits.shape[1])
        top = logits.topk(k, dim=-1).indices
        top1 = (top[:, 0] == targets).sum()
        # Tokens with fewer than 5 senses have -inf entries in their top 5: those never match a real target.
        top5 = (top == targets[:, None]).any(dim=-1).sum()
    return loss, top1, top5


def soft_kl_sum(log_q, soft_ids, soft_probs):
    """Sum over positions of KL(p || q), p = the teacher's top-k probabilities renormalised to 1."""
    valid = soft_ids >= 0
    p = torch.where(valid, soft_probs.float(), torch.zeros_like(soft_probs, dtype=torch.float32))
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    log_q_at = log_q.gather(1, soft_ids.clamp_min(0).long())
    log_p = torch.log(p.clamp_min(1e-12))
    return torch.where(valid & (p > 0), p * (log_p - log_q_at), torch.zeros_like(p)).sum()


def sense_kd_loss(student_states, input_ids, targets, centres, sense_mask, token_to_row,
                  soft_ids=None, soft_probs=None, chunk_positions: int = 0, temperature: float = 1.0,
                  similarity: str = "dot"):
    """(mean loss over labelled positions, stats {correct_top1, correct_top5, n}) for one batch.

    student_states [B, L, d]; input_ids, targets [B, L] (target -1: ignore); centres [T, K, d],
    sense_mask [T, K], token_to_row [V] from SenseDictionary.padded. With soft_ids/soft_probs
    [B, L, k] the loss is KL to the teacher's top-k (student logits / temperature, times
    temperature^2 as in Hinton et al.). chunk_positions > 0 processes that many positions at a
    time and recomputes each chunk's gather in backward, so memory is bounded by one chunk.
    Stats are 0-dim tensors (no host sync); a batch without labels gives a zero loss that
    still reaches every parameter, so DeepSpeed's backward runs the same on every rank.
    For similarity cos or l2, `centres` must come from `sense_table(centres, similarity)`.
    """
    d = student_states.shape[-1]
    index, rows = labelled_positions(input_ids, targets, token_to_row)
    states = sense_queries(student_states.reshape(-1, d)[index], similarity)
    target = targets.reshape(-1)[index].long()
    soft_i = soft_p = None
    if soft_ids is not None:
        soft_i = soft_ids.reshape(-1, soft_ids.shape[-1])[index].long()
        soft_p = soft_probs.reshape(-1, soft_probs.shape[-1])[index]
    n = index.numel()
    step = chunk_positions if 0 < chunk_positions < n else max(n, 1)
    total = student_states.sum() * 0.0
    top1 = torch.zeros((), dtype=torch.long, device=student_states.device)
    top5 = torch.zeros_like(top1)
    for start in range(0, n, step):
        part = slice(start, start + step)
        args = (states[part], rows[part], target[part], centres, sense_mask,
                None if soft_i is None else soft_i[part], None if soft_p is None else soft_p[part], temperature)
        if step < n and torch.is_grad_enabled():
            loss, hit1, hit5 = checkpoint(_chunk_terms, *args, use_reentrant=False)
        else:
            loss, hit1, hit5 = _chunk_terms(*args)
        total = total + loss
        top1, top5 = top1 + hit1, top5 + hit5
    mean = total / max(n, 1)
    return mean, {"correct_top1": top1, "correct_top5": top5, "n": torch.tensor(n, device=student_states.device)}


def mse_loss(student_states, teacher_states, mask):
    """Mean squared error over the positions where `mask` is true (mean over the width too)."""
    keep = mask.reshape(-1).bool()
    d = student_states.shape[-1]
    diff = student_states.reshape(-1, d)[keep].float() - teacher_states.reshape(-1, d)[keep].float()
    n = int(keep.sum())
    if n == 0:
        return student_states.sum() * 0.0, {"n": torch.tensor(0)}
    return diff.pow(2).mean(), {"n": torch.tensor(n)}


def reference_loop_loss(student_states, input_ids, targets, centres, sense_mask, token_to_row):
    """THE SLOW BASELINE: one token at a time, as the reference code's double loop does.

    For testing `sense_kd_loss` against and for the benchmark only; never for training.
    """
    total, n = student_states.sum() * 0.0, 0
    batch, length = targets.shape
    for b in range(batch):
        for pos in range(length):
            target = int(targets[b, pos])
            token = int(input_ids[b, pos])
            row = int(token_to_row[token]) if 0 <= token < token_to_row.shape[0] else -1
            if target < 0 or row < 0:
                continue
            senses = centres[row][sense_mask[row]]  # this token's own senses, unpadded
            logits = senses @ student_states[b, pos]
            total = total + F.cross_entropy(logits[None], torch.tensor([target], device=logits.device))
            n += 1
    return total / max(n, 1)


def positions_per_chunk(k_max: int, d: int, budget_elements: int = 1 << 26) -> int:
    """How many positions to gather at once so the [N, K, d] senses stay under `budget_elements`."""
    return max(1, budget_elements // max(k_max * d, 1))
