"""The GLUE setting's judge: every system's final states through the tuned teacher's frozen head.

    metrics.update(task_head_metrics(cfg, encoders, notes))

The labelled split (task.test, else task.validation) is tokenised once with the teacher's
tokenizer (finetune.max_length, as in fine-tuning) and batched by eval.batch_size, longest
first. Each encoder runs once per batch; each system of probes.SYSTEMS takes its states
[B, L, d] at the teacher's width: continuous systems the final states, sense systems those
states snapped to the dictionary at content (non-special) positions. The states are pooled
as the head pools them (classifier.pool_states: content tokens only) and go through
classifier.pooled_logits of the head saved with model.teacher, the one way logits are
computed in fine-tuning too, so the teacher system reproduces the tuned model.

Beside it, the two baselines a user compares the sense student with:
  student_tuned  the student's architecture fine-tuned directly on the labels with the sense
                 student's budget (finetune.backbone=student: RUN/student_tuned/final, or
                 eval.tuned_student), judged through its own fine-tuned head;
  own head       every system with a head of its own: a logistic regression (scaled features)
                 fitted on the pooled states of eval.own_head_examples training examples and
                 scored on the same judged split (own_head_accuracy, own_head_macro_f1).
Keys: task.<task>.<system>.{accuracy, macro_f1, stderr, ratio_to_teacher, own_head_accuracy,
own_head_macro_f1} (None for a system that is not there). Untrained layers land at chance
through the teacher's head; what distillation buys shows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dist_sense import comm
from dist_sense.config import RunConfig
from dist_sense.formats.tasks import EncodedSplit, TaskSplit, collate, encode_split, load_task
from dist_sense.model.classifier import HEAD_INFO, TaskHead, load_task_head, pool_states, pooled_logits
from dist_sense.stages.evaluate.probes import SYSTEMS, EvalError, fit_logistic

log = comm.get_logger("dist_sense.task_head")

TUNED_STUDENT = "student_tuned"
TASK_SYSTEMS = {**SYSTEMS, TUNED_STUDENT: (TUNED_STUDENT, "continuous")}
"""Systems of this protocol: the probes' five and the directly fine-tuned student (its own head)."""
METRICS = ("accuracy", "macro_f1", "stderr", "ratio_to_teacher", "own_head_accuracy", "own_head_macro_f1")
OWN_HEAD_SEED = 0
"""Seed of the draw of training examples the own heads are fitted on."""
OWN_HEAD_MAX_ITER = 1000


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


def tuned_student_dir(cfg: RunConfig) -> Path:
    """eval.tuned_student, else RUN/student_tuned/final (where finetune.backbone=student writes it)."""
    return Path(cfg.eval.tuned_student) if cfg.eval.tuned_student else cfg.run_path / TUNED_STUDENT / "final"


def open_tuned_student(cfg: RunConfig, notes: dict, device):
    """(the directly fine-tuned student's Student, its TaskHead), or None with the reason in notes['skipped']
    when it is not there and eval.tuned_student does not name it."""
    from dist_sense.model.classifier import load_task_model

    path = tuned_student_dir(cfg)
    if not (path / HEAD_INFO).is_file():
        if cfg.eval.tuned_student:
            raise EvalError(f"eval.tuned_student={path}: no {HEAD_INFO} there; run launcher/finetune.py "
                            f"finetune.backbone=student and point eval.tuned_student at its final/ folder")
        notes.setdefault("skipped", {})[TUNED_STUDENT] = (
            f"{path} does not exist: run launcher/finetune.py finetune.backbone=student (or set "
            f"eval.tuned_student) to compare with the student fine-tuned directly on the labels")
        return None
    model = load_task_model(path, device)
    notes.setdefault("students", {})[TUNED_STUDENT] = str(path)
    return model.backbone, model.head


def system_states(encoder, kind: str, batch: dict, device, states: torch.Tensor) -> torch.Tensor:
    """[B, L, d] states of one system on a collated batch, from its encoder's forward `states`: as they
    are, or snapped to senses at content positions for kind 'senses' (special and padding positions keep
    theirs)."""
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    if kind == "senses":
        content = mask.bool() & ~batch["special_mask"].to(device).bool()
        states = states.clone()
        states[content] = encoder.table.snap(ids[content], states[content])[1].to(states.dtype)
    return states


@torch.no_grad()
def pooled_features(encoders: dict, systems: dict, encoded: EncodedSplit, batch_size: int, pad_id: int,
                    pooling: str, what: str) -> dict[str, np.ndarray]:
    """system -> float32 [n, d] pooled states (split row order) of every system in `systems` (system ->
    (encoder name, kind)) whose encoder is present; each encoder runs once per batch."""
    from tqdm import tqdm

    present = {s: (e, kind) for s, (e, kind) in systems.items() if encoders.get(e) is not None}
    features: dict[str, np.ndarray] = {}
    # Longest first, so each batch holds rows of similar length and little of a forward is padding.
    order = np.argsort([-len(row) for row in encoded.input_ids], kind="stable")
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=what, unit="batch", disable=not comm.detect().is_main, leave=False):
        rows = order[start:start + batch_size]
        batch = collate(encoded, rows, pad_id)
        forwards: dict[str, torch.Tensor] = {}
        for system, (name, kind) in present.items():
            encoder = encoders[name]
            if name not in forwards:  # SenseEncoder's forward: the states it snaps, at the teacher's width
                forwards[name] = encoder._forward(batch["input_ids"].to(encoder.device),
                                                  batch["attention_mask"].to(encoder.device)).float()
            states = system_states(encoder, kind, batch, encoder.device, forwards[name])
            if system not in features:
                features[system] = np.empty((len(encoded), states.shape[-1]), dtype=np.float32)
            device = states.device
            pooled = pool_states(states, batch["attention_mask"].to(device), batch["special_mask"].to(device), pooling)
            features[system][rows] = pooled.cpu().numpy()
    return features


@torch.no_grad()
def head_predictions(head: TaskHead, features: np.ndarray, system: str, chunk: int = 4096) -> np.ndarray:
    """int64 [n] label ids `head` gives pooled states [n, d]."""
    if features.shape[1] != head.d:
        raise EvalError(f"{system}: states of width {features.shape[1]}, but the head reads d={head.d}: the "
                        f"system must output the teacher's width (a student: its adaptor)")
    device = head.dense.weight.device
    out = [pooled_logits(head, torch.from_numpy(features[i:i + chunk]).to(device)).argmax(dim=-1).cpu().numpy()
           for i in range(0, len(features), chunk)]
    return np.concatenate(out).astype(np.int64)


def own_head_predictions(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Predictions on `test` of a logistic regression (scaled features) fitted on `train`."""
    return fit_logistic(train, train_labels, OWN_HEAD_MAX_ITER).predict(test).astype(np.int64)


def macro_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Unweighted mean over the classes in truth or predictions of 2 tp / (2 tp + fp + fn) (sklearn's macro F1)."""
    scores = []
    for label in np.union1d(truth, predicted):
        tp = int(((predicted == label) & (truth == label)).sum())
        wrong = int(((predicted == label) != (truth == label)).sum())  # fp + fn
        scores.append(2 * tp / (2 * tp + wrong))
    return float(np.mean(scores))


def score(name: str, truth: np.ndarray, predictions: dict, own: dict | None = None) -> dict:
    """task.<name>.<system>.<metric> for every system of TASK_SYSTEMS (None where it has no predictions).
    predictions: system -> label ids through the judging head; own: system -> label ids of its own head."""
    metrics = {f"task.{name}.{system}.{m}": None for system in TASK_SYSTEMS for m in METRICS}
    n = len(truth)
    accuracy = {system: float((p == truth).mean()) for system, p in predictions.items()}
    teacher = accuracy.get("teacher")
    for system, predicted in predictions.items():
        p = accuracy[system]
        metrics.update({f"task.{name}.{system}.accuracy": p,
                        f"task.{name}.{system}.macro_f1": macro_f1(truth, predicted),
                        f"task.{name}.{system}.stderr": float(np.sqrt(p * (1 - p) / n)),
                        f"task.{name}.{system}.ratio_to_teacher": p / teacher if teacher else None})
    for system, predicted in (own or {}).items():
        metrics.update({f"task.{name}.{system}.own_head_accuracy": float((predicted == truth).mean()),
                        f"task.{name}.{system}.own_head_macro_f1": macro_f1(truth, predicted)})
    return metrics


def own_head_sample(split: TaskSplit, limit: int) -> TaskSplit:
    """At most `limit` rows of a split, drawn with OWN_HEAD_SEED (all of it when it is smaller)."""
    if len(split) <= limit:
        return split
    rows = np.sort(np.random.default_rng(OWN_HEAD_SEED).permutation(len(split))[:limit])
    return TaskSplit(split.name, split.path, [split.texts[i] for i in rows],
                     None if split.pairs is None else [split.pairs[i] for i in rows], split.label_ids[rows])


def task_head_metrics(cfg: RunConfig, encoders: dict, notes: dict) -> dict:
    """task.<task>.<system>.* of every system judged through the tuned teacher's frozen head, the tuned
    student through its own, and every system's own head; {} with the reason in notes["skipped"]["task_head"]
    when no task is set or the teacher has no head. The tuned student is opened here (tuned_student_dir)."""
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
    teacher_encoder = encoders["teacher"]
    head = load_task_head(cfg.model.teacher, teacher_encoder.device)
    if list(task.labels) != list(head.labels):
        raise EvalError(f"{Path(cfg.model.teacher) / HEAD_INFO}: the head's labels {head.labels} are not the task's "
                        f"{task.labels} ({cfg.task.train}): the tuned teacher was trained on another task")
    encoders = dict(encoders)
    tuned = open_tuned_student(cfg, notes, teacher_encoder.device)
    if tuned is not None:
        encoders[TUNED_STUDENT] = teacher_encoder.with_model(tuned[0])
        if tuned[1].pooling != head.pooling or list(tuned[1].labels) != list(head.labels):
            raise EvalError(f"{tuned_student_dir(cfg) / HEAD_INFO}: pooling {tuned[1].pooling!r}, labels "
                            f"{tuned[1].labels}; the tuned teacher's head has {head.pooling!r}, {head.labels}: "
                            f"tune the student on the same task with the same finetune.pooling")
    tokenizer, pad_id = teacher_encoder.tokenizer, teacher_encoder.tokenizer.pad_token_id
    split = task.splits[split_name]
    encoded = encode_split(split, tokenizer, cfg.finetune.max_length)
    judged = pooled_features(encoders, TASK_SYSTEMS, encoded, cfg.eval.batch_size, pad_id, head.pooling,
                             f"task {task.name}: {split_name}")
    predictions = {system: head_predictions(tuned[1] if system == TUNED_STUDENT else head, features, system)
                   for system, features in judged.items()}
    train = own_head_sample(task.splits["train"], cfg.eval.own_head_examples)
    train_encoded = encode_split(train, tokenizer, cfg.finetune.max_length)
    fitted = pooled_features(encoders, TASK_SYSTEMS, train_encoded, cfg.eval.batch_size, pad_id, head.pooling,
                             f"task {task.name}: own-head train")
    own = {system: own_head_predictions(fitted[system], train_encoded.label_ids, judged[system]) for system in judged}
    metrics = score(task.name, encoded.label_ids, predictions, own)
    notes["task_head"] = {"task": task.name, "split": split_name, "path": str(split.path), "examples": len(encoded),
                          "truncated": encoded.truncated, "max_length": cfg.finetune.max_length,
                          "pooling": head.pooling, "labels": list(head.labels), "teacher": str(cfg.model.teacher),
                          "layer": cfg.model.layer, "own_head_examples": len(train_encoded),
                          "systems": sorted(predictions),
                          "tuned_student": str(tuned_student_dir(cfg)) if tuned is not None else None}
    log.info("task %s (%s, %d examples, %s pooling) through the teacher's head: %s", task.name, split_name,
             len(encoded), head.pooling,
             ", ".join(f"{s} {metrics[f'task.{task.name}.{s}.accuracy']:.4f}" for s in predictions))
    return metrics
