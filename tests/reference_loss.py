"""The reference code's sense loss, one token at a time: what `sense_kd_loss` is tested against.

A test helper only (tests/ is on sys.path under pytest): the package trains with the batched
`dist_sense.model.losses.sense_kd_loss`, never with this loop.
"""
import torch
import torch.nn.functional as F


def reference_loop_loss(student_states, input_ids, targets, centres, sense_mask, token_to_row):
    """Mean cross-entropy of the labelled positions, each scored by dot product against its own
    token's unpadded senses, as the reference code's double loop over batch and position does."""
    total, n = student_states.sum() * 0.0, 0
    batch, length = targets.shape
    for b in range(batch):
        for pos in range(length):
            target = int(targets[b, pos])
            token = int(input_ids[b, pos])
            row = int(token_to_row[token]) if 0 <= token < token_to_row.shape[0] else -1
            if target < 0 or row < 0:
                continue
            senses = centres[row][sense_mask[row]]
            logits = senses @ student_states[b, pos]
            total = total + F.cross_entropy(logits[None], torch.tensor([target], device=logits.device))
            n += 1
    return total / max(n, 1)
