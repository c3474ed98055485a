"""Share of a distillation training step spent in the sense loss, on demo-sized batches.

Student: the demo teacher (all-MiniLM-L6-v2) cut to its first 2 of 6 layers, input embeddings
frozen, as the demo trains it. Batches: the demo's micro batch, 16 WordNet windows of at most
48 tokens each, every token labelled with the teacher's nearest sense (l2, the label stage's
default) in the benchmark dictionary (k = 20, d = 384). step_s: one whole training step per
batch: student forward, sense loss as the distill stage calls it (SenseTable.compute),
backward, gradient clipping at 1.0 and a torch AdamW step (the optimizer DeepSpeed runs on
CPU, here without the engine around it, so if anything the step is shorter than in training).
loss_s: the sense loss alone, forward and backward, on the same batches and the student's
states for them. loss_share_of_step = loss_s / step_s. Both are seconds per batch, the best
of rounds that alternate between the two over the same batches in one process.

Command: `python -m bench.loss_share_of_step` (`make bench` runs it with the others). This
share is why the sense loss is plain torch on every device: a compiled CPU kernel for it saved
under 1% of a step, and was removed.
"""
from __future__ import annotations

import time

import torch

from bench import common

BATCHES, ROUNDS = 8, 5
MICRO_BATCH, MAX_LENGTH = 16, 48  # the demo's distill.micro_batch_size and corpus.max_length
SIMILARITY, LR, WEIGHT_DECAY, CLIP = "l2", 5e-4, 0.01, 1.0  # the demo's settings and ds_configs/z2.json's clipping


def labelled_batches(dictionary, teacher) -> list[dict]:
    """BATCHES micro batches of WordNet windows with the teacher's nearest senses as targets (-1: padding)."""
    batches = []
    for ids, attention in common.text_batches(400, MICRO_BATCH, MAX_LENGTH)[:BATCHES]:
        with torch.no_grad():
            states = teacher(input_ids=ids, attention_mask=attention).last_hidden_state
        flat = states.reshape(-1, states.shape[-1]).numpy()
        targets = torch.from_numpy(dictionary.nearest(ids.numpy(), flat, SIMILARITY)).long().reshape(ids.shape)
        targets[attention == 0] = -1
        batches.append({"input_ids": ids, "attention_mask": attention, "targets": targets})
    return batches


def adamw(student) -> torch.optim.Optimizer:
    """AdamW over the parameters the demo trains: everything but the input embeddings."""
    student.backbone.get_input_embeddings().requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)


def seconds_per_batch(fn, batches) -> float:
    start = time.perf_counter()
    for batch in batches:
        fn(batch)
    return (time.perf_counter() - start) / len(batches)


def main() -> dict:
    common.single_process_env()
    from transformers import AutoModel

    from dist_sense.config import RunConfig
    from dist_sense.formats.dictionary import SenseDictionary
    from dist_sense.model.student import build_student
    from dist_sense.model.teacher import resolve_model_path
    from dist_sense.stages.distill.stage import SenseTable

    dictionary = SenseDictionary.load(common.teacher_dictionary() / "dictionary")
    teacher = AutoModel.from_pretrained(resolve_model_path(common.DEMO_MODEL)).eval()
    batches = labelled_batches(dictionary, teacher)
    senses = SenseTable(dictionary, "cpu", "kd", 1.0, similarity=SIMILARITY)
    student = build_student(RunConfig.load(None, [f"model.teacher={common.DEMO_MODEL}", "distill.layers=2"]), 384)
    student.train()
    optimizer = adamw(student)
    trained = [p for group in optimizer.param_groups for p in group["params"]]

    def step(batch):
        loss, _ = senses.compute(student(batch["input_ids"], batch["attention_mask"]), batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with torch.no_grad():  # the loss's inputs: the student's states for each batch
        for batch in batches:
            batch["states"] = student(batch["input_ids"], batch["attention_mask"]).requires_grad_(True)

    def loss_only(batch):
        batch["states"].grad = None
        loss, _ = senses.compute(batch["states"], batch)
        loss.backward()

    step(batches[0])  # warm-up: first-call allocations and AdamW's state
    loss_only(batches[0])
    rounds = [(seconds_per_batch(step, batches), seconds_per_batch(loss_only, batches)) for _ in range(ROUNDS)]
    step_s, loss_s = min(r[0] for r in rounds), min(r[1] for r in rounds)
    labelled = sum(int(((b["targets"] >= 0) & (senses.token_to_row[b["input_ids"]] >= 0)).sum()) for b in batches)
    figures = {"loss_share_of_step": loss_s / step_s, "step_s": step_s, "loss_s": loss_s,
               "rounds_step_s": [round(r[0], 4) for r in rounds], "rounds_loss_s": [round(r[1], 5) for r in rounds],
               "batches": len(batches), "micro_batch": MICRO_BATCH, "max_length": MAX_LENGTH,
               "labelled_positions_per_batch": labelled / len(batches), "similarity": SIMILARITY,
               "k_max": int(senses.centres.shape[1]), "trained_parameters": sum(p.numel() for p in trained)}
    return common.record("loss_share_of_step", figures, {"loss_share_of_step": "<= 0.05"})


if __name__ == "__main__":
    main()
