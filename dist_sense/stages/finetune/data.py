"""The labelled train split as rank-aligned micro-batches with a resumable position, and the held-out batches.

The contract is that of formats.labels.LabelData, which the checkpoint functions of
stages/distill/checkpoints.py rely on: `position()` / `restore()` and `next_batch()`.
Order: each epoch is a permutation of the train examples drawn from (seed, epoch), cut to
whole optimizer steps; micro-batch m of rank r is order[(m * world + r) * micro : ... + micro].
So every rank runs the same number of micro-batches (ZeRO-2 reduces gradients at every step;
unequal counts would hang), and one global step covers the same examples whatever the world size.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dist_sense.formats.batching import length_groups
from dist_sense.formats.tasks import EncodedSplit, TaskError, collate
from dist_sense.stages.distill.checkpoints import CheckpointError


class TaskBatches:
    """This rank's training micro-batches of an encoded train split."""

    def __init__(self, encoded: EncodedSplit, source: Path, rank: int, world_size: int, micro_batch: int,
                 global_batch: int, seed: int = 0, pad_id: int = 0, group_steps: int = 0):
        self.encoded, self.rank, self.world, self.micro = encoded, rank, world_size, micro_batch
        self.seed, self.pad_id, self.global_batch, self.group_steps = seed, pad_id, global_batch, group_steps
        self.lengths = np.array([len(row) for row in encoded.input_ids])
        if global_batch % (world_size * micro_batch):
            raise ValueError(f"global batch {global_batch} is not a multiple of {world_size} x {micro_batch}")
        n = len(encoded)
        # Epochs hold whole optimizer steps, so where an epoch ends does not depend on the world size.
        self.micro_per_epoch = (n // global_batch) * (global_batch // (world_size * micro_batch))
        if self.micro_per_epoch == 0:
            raise TaskError(f"{source}: its {n} training examples do not fill one step of "
                            f"finetune.global_batch_size={global_batch}: lower finetune.global_batch_size "
                            f"(and finetune.micro_batch_size) or add examples")
        self.epoch, self.micro_done = 0, 0
        self._order: np.ndarray | None = None

    def position(self) -> dict:
        """Where the next micro-batch starts: epoch and training examples consumed in it (all ranks)."""
        return {"epoch": self.epoch, "samples": self.micro_done * self.micro * self.world}

    def restore(self, position: dict) -> None:
        per_round = self.micro * self.world
        samples = int(position["samples"])
        if samples % per_round:
            raise CheckpointError(f"saved data position {position} is not a whole number of {self.world} x "
                                  f"{self.micro} micro-batches: resume with the original world size and batch sizes")
        self.epoch, self.micro_done, self._order = int(position["epoch"]), samples // per_round, None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Row numbers of the epoch's training examples, in order, cut to whole optimizer steps.

        With group_steps, each run of group_steps steps' examples (of the shuffled order) is sorted by
        length and cut into steps, and those steps are shuffled: a step's examples have similar lengths,
        so its micro-batches pad little, and the order stays a function of (seed, epoch) alone."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.encoded))[: self.micro_per_epoch * self.world * self.micro]
        if not self.group_steps:
            return order
        # The epoch holds whole steps, and so does every group: each block is one step.
        return order[length_groups(self.lengths[order], self.group_steps * self.global_batch, self.global_batch, rng)]

    def next_batch(self) -> dict:
        """This rank's next micro-batch (input_ids, attention_mask, special_mask, labels); epochs roll over."""
        if self.micro_done >= self.micro_per_epoch:
            self.epoch, self.micro_done, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self.epoch_order(self.epoch)
        start = (self.micro_done * self.world + self.rank) * self.micro
        self.micro_done += 1
        return collate(self.encoded, self._order[start:start + self.micro], self.pad_id)


def held_out_batches(encoded: EncodedSplit, rank: int, world_size: int, micro_batch: int, pad_id: int = 0):
    """This rank's micro-batches of a held-out split: rows longest first, so a batch pads little; batch b
    goes to rank b % world (the counts may differ by one, which is fine: nothing collective runs inside
    a ZeRO-2 forward)."""
    order = np.argsort([-len(row) for row in encoded.input_ids], kind="stable")
    for start in range(rank * micro_batch, len(order), world_size * micro_batch):
        yield collate(encoded, order[start:start + micro_batch], pad_id)
