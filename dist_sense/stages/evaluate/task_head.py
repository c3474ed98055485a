"""The GLUE setting's judge: every system's final states through the tuned teacher's frozen head.

    metrics.update(task_head_metrics(cfg, encoders, notes))

The labelled split (task.test, else task.validation) is tokenised once with the teacher's
tokenizer (finetune.max_length, as in fine-tuning) and batched by eval.batch_size. Each system
of probes.SYSTEMS gives states [B, L, d] at the teacher's width: continuous systems their final
states, sense systems those states snapped to the dictionary at content (non-special) positions.
Special and padding positions keep their states: the head pools content tokens only. The
states go through classifier.head_logits of the head saved with model.teacher, the one way
logits are computed in fine-tuning too, so the teacher system reproduces the tuned model.
Keys: task.<task>.<system>.{accuracy, macro_f1, stderr, ratio_to_teacher} (None for a system
that is not there). Untrained layers land at chance here; what distillation buys shows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dist_sense import comm
from dist_sense.config import RunConfig
from dist_sense.formats.tasks import EncodedSplit, collate, encode_split, load_task
from dist_sense.model.classifier import HEAD_INFO, TaskHead, head_logits, load_task_head
from dist_sense.stages.evaluate.probes import SYSTEMS, EvalError

log = comm.get_logger("dist_sense.task_head")

METRICS = ("accuracy", "macro_f1", "stderr", "ratio_to_teacher")


def judged_split(cfg: RunConfig) -> str:
    """The split the head judges: test when task.test is set, else validation; '' when no task is set."""
    if cfg.task.test:
        return "test"
    return "validation" if cfg.task.validation else ""


def skip_reason(cfg: RunConfig) -> str:
    """Why the teacher-head protocol cannot run ('' when it can)."""
    if not judged_split(cfg):
        return "no labelled task (task.validation / task.test unset): the GLUE-setting head protocol is skipped"
    if not cfg.model.teacher or not (Path(cfg.model.teacher) / HEAD_INFO).is_file():
        return (f"model.teacher={cfg.model.teacher!r} has no {HEAD_INFO}: not a fine-tuned teacher; use the "
                f"finetune stage's RUN/teacher_tuned/final as model.teacher to judge through its head")
    return ""


def system_states(encoder, kind: str, batch: dict, device) -> torch.Tensor:
    """[B, L, d] states of one system on a collated batch: the encoder's final states, snapped to senses
    at content positions for kind 'senses'; special and padding positions keep their states."""
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    # SenseEncoder's forward: the states it snaps (the teacher's layer, a student's output at the teacher's width).
    states = encoder._forward(ids, mask).float()
    if kind == "senses":
        content = mask.bool() & ~batch["special_mask"].to(device).bool()
        states = states.clone()
        states[content] = encoder.table.snap(ids[content], states[content])[1].to(states.dtype)
    return states


@torch.no_grad()
def system_predictions(encoders: dict, head: TaskHead, encoded: EncodedSplit, batch_size: int, pad_id: int) -> dict:
    """system -> int64 [n] predicted label ids (in the split's row order) of every system whose encoder is present."""
    present = {s: (enc, kind) for s, (enc, kind) in SYSTEMS.items() if encoders.get(enc) is not None}
    predictions = {system: np.empty(len(encoded), dtype=np.int64) for system in present}
    # Longest first, so each batch holds rows of similar length and little of a forward is padding.
    order = np.argsort([-len(row) for row in encoded.input_ids], kind="stable")
    device = head.dense.weight.device
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = collate(encoded, rows, pad_id)
        attention, special = batch["attention_mask"].to(device), batch["special_mask"].to(device)
        for system, (name, kind) in present.items():
            encoder = encoders[name]
            states = system_states(encoder, kind, batch, encoder.device).to(device)
            if states.shape[-1] != head.d:
                raise EvalError(f"{system}: states of width {states.shape[-1]}, but the tuned teacher's head reads "
                                f"d={head.d}: the {name} encoder must output the teacher's width (its adaptor)")
            predictions[system][rows] = head_logits(head, states, attention, special).argmax(dim=-1).cpu().numpy()
    return predictions


def macro_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Unweighted mean over the classes in truth or predictions of 2 tp / (2 tp + fp + fn) (sklearn's macro F1)."""
    scores = []
    for label in np.union1d(truth, predicted):
        tp = int(((predicted == label) & (truth == label)).sum())
        wrong = int(((predicted == label) != (truth == label)).sum())  # fp + fn
        scores.append(2 * tp / (2 * tp + wrong))
    return float(np.mean(scores))


def score(name: str, truth: np.ndarray, predictions: dict) -> dict:
    """task.<name>.<system>.<metric> for every system of SYSTEMS (None where it has no predictions)."""
    metrics = {f"task.{name}.{system}.{m}": None for system in SYSTEMS for m in METRICS}
    n = len(truth)
    accuracy = {system: float((p == truth).mean()) for system, p in predictions.items()}
    teacher = accuracy.get("teacher")
    for system, predicted in predictions.items():
        p = accuracy[system]
        metrics.update({f"task.{name}.{system}.accuracy": p,
                        f"task.{name}.{system}.macro_f1": macro_f1(truth, predicted),
                        f"task.{name}.{system}.stderr": float(np.sqrt(p * (1 - p) / n)),
                        f"task.{name}.{system}.ratio_to_teacher": p / teacher if teacher else None})
    return metrics


def task_head_metrics(cfg: RunConfig, encoders: dict, notes: dict) -> dict:
    """task.<task>.<system>.* of every system judged through the tuned teacher's frozen head;
    {} with the reason in notes["skipped"]["task_head"] when no task is set or the teacher has no head."""
    reason = skip_reason(cfg)
    if reason:
        notes.setdefault("skipped", {})["task_head"] = reason
        log.info("task head skipped: %s", reason)
        return {}
    split_name = judged_split(cfg)
    if cfg.model.layer != -1:
        log.warning("model.layer=%d: the tuned head was trained on the last layer's states; unless layer %d is the "
                    "last, every system is judged on states the head never saw", cfg.model.layer, cfg.model.layer)
    task = load_task(cfg.task)
    head = load_task_head(cfg.model.teacher, encoders["teacher"].device)
    if list(task.labels) != list(head.labels):
        raise EvalError(f"{Path(cfg.model.teacher) / HEAD_INFO}: the head's labels {head.labels} are not the task's "
                        f"{task.labels} ({cfg.task.train}): the tuned teacher was trained on another task")
    tokenizer = encoders["teacher"].tokenizer
    split = task.splits[split_name]
    encoded = encode_split(split, tokenizer, cfg.finetune.max_length)
    predictions = system_predictions(encoders, head, encoded, cfg.eval.batch_size, tokenizer.pad_token_id)
    metrics = score(task.name, encoded.label_ids, predictions)
    notes["task_head"] = {"task": task.name, "split": split_name, "path": str(split.path), "examples": len(encoded),
                          "truncated": encoded.truncated, "max_length": cfg.finetune.max_length,
                          "pooling": head.pooling, "labels": list(head.labels), "teacher": str(cfg.model.teacher),
                          "layer": cfg.model.layer,
                          "systems": sorted(predictions)}
    log.info("task %s (%s, %d examples, %s pooling) through the teacher's head: %s", task.name, split_name,
             len(encoded), head.pooling,
             ", ".join(f"{s} {metrics[f'task.{task.name}.{s}.accuracy']:.4f}" for s in predictions))
    return metrics
