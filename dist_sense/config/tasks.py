"""Config sections of the GLUE setting: the labelled task (`task.*`) and the teacher's fine-tuning (`finetune.*`).

Kept apart from config/__init__.py, which holds the sections of the sense pipeline; RunConfig
carries both as `cfg.task` and `cfg.finetune`. Like every section they validate themselves at
construction, with errors naming the dotted key. Whether the files exist is checked when the
task is read (formats/tasks.py), since most stages never read it.
"""
from __future__ import annotations

from dataclasses import dataclass

from dist_sense.config.fields import (
    ConfigError,
    Section,
    TrainingSection,
    check_choice,
    check_nonnegative,
    check_positive,
)

POOLINGS = ("first_token", "mean")
BACKBONES = ("teacher", "student")


@dataclass
class TaskConfig(Section):
    _key = "task"
    name: str = "task"
    """Name of the labelled task (recorded in the tuned teacher's task_head.json and in reports)."""
    train: str = ""
    """Training split: a .jsonl/.json, .csv or .parquet file (or a folder of them, one format)."""
    validation: str = ""
    """Validation split, same format: accuracy during fine-tuning and, later, the judged split."""
    test: str = ""
    """Optional test split with labels (empty: none); scored once at the end of fine-tuning."""
    text_field: str = "text"
    """Column holding the text (the first sentence of a pair task)."""
    text_pair_field: str = ""
    """Column holding the second sentence of a sentence-pair task (empty: single sentences)."""
    label_field: str = "label"
    """Column holding the label: strings or integers; ids follow the sorted labels of the train split."""

    def _check(self) -> None:
        if not self.name.strip():
            raise ConfigError("task.name: must not be empty")
        if not self.text_field:
            raise ConfigError("task.text_field: must not be empty")
        if not self.label_field:
            raise ConfigError("task.label_field: must not be empty")
        fields = {"task.text_field": self.text_field, "task.label_field": self.label_field}
        if self.text_pair_field:
            fields["task.text_pair_field"] = self.text_pair_field
        if len(set(fields.values())) < len(fields):
            named = ", ".join(f"{k}={v!r}" for k, v in fields.items())
            raise ConfigError(f"{named}: each must name a different column")

    def split_paths(self) -> dict[str, str]:
        """{split name: path} of the splits given (test only when set)."""
        paths = {"train": self.train, "validation": self.validation}
        if self.test:
            paths["test"] = self.test
        return paths


@dataclass
class FinetuneConfig(TrainingSection):
    _key = "finetune"
    backbone: str = "teacher"
    """What is fine-tuned: teacher (finetune.teacher, else model.teacher, into the tuned teacher) or
    student (the baseline: the distilled student's architecture and starting weights, distill.init
    from model.teacher, trained on the labels with distill's steps, batch sizes and optimizer values)."""
    teacher: str = ""
    """The base model backbone=teacher tunes (a model folder or pkg:NAME); empty means model.teacher.
    Set it when model.teacher names the tuned teacher, so one config serves the whole chain."""
    steps: int = 1000
    """Optimizer steps of fine-tuning the teacher (backbone and head together) on task.train."""
    lr: float = 2e-5
    """Peak learning rate (AdamW, linear warm-up then cosine decay)."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay (not on biases and norms)."""
    global_batch_size: int = 32
    """Labelled examples per optimizer step over all ranks."""
    micro_batch_size: int = 16
    """Examples per forward on one rank; accumulation = global / (micro * world)."""
    eval_every: int = 100
    """Validation accuracy at the start and every this many steps (0: only at the end)."""
    save_every: int = 200
    """DeepSpeed checkpoint every this many steps (and always at the end)."""
    seed: int = 0
    """Seed of the head's initialisation, the data order and dropout."""
    ds_config: str = "ds_configs/z2.json"
    """DeepSpeed engine config (ZeRO stage 0-2); batch sizes, optimizer values and schedule come from finetune.*."""
    group_by_length: int = 0
    """Length grouping: each run of this many steps' shuffled examples is sorted by length, cut into
    steps and the steps shuffled, so batches pad little (0: plain shuffling)."""
    freeze_embeddings: bool = False
    """Keep the teacher's input embeddings fixed (backbone=teacher): most of a small encoder's parameters,
    whose gradients and optimizer state cost time on every step. backbone=student follows
    distill.freeze_embeddings instead."""
    pooling: str = "first_token"
    """What the head reads: first_token (the state of the first non-special token, as the reference's
    pooler over positions 1:) or mean (the mean over non-special, non-padding tokens)."""
    max_length: int = 128
    """Most tokens per example, special tokens included; longer examples (pairs: the longer side first) are cut."""
    output: str = ""
    """Output folder; empty means RUN/teacher_tuned (RUN/student_tuned for backbone=student). The tuned
    teacher is OUTPUT/final (use it as model.teacher)."""

    def _check(self) -> None:
        for name in ("steps", "global_batch_size", "micro_batch_size", "max_length"):
            check_positive(f"finetune.{name}", getattr(self, name))
        for name in ("warmup_steps", "eval_every", "save_every", "group_by_length"):
            check_nonnegative(f"finetune.{name}", getattr(self, name))
        if self.lr <= 0:
            raise ConfigError(f"finetune.lr={self.lr}: must be > 0")
        check_nonnegative("finetune.weight_decay", self.weight_decay)
        check_choice("finetune.pooling", self.pooling, POOLINGS)
        check_choice("finetune.backbone", self.backbone, BACKBONES)
        if self.max_length < 3:
            raise ConfigError(f"finetune.max_length={self.max_length}: must leave room for a token besides "
                              f"the special ones (at least 3)")
