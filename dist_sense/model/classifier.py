"""The fine-tuned teacher of the GLUE setting: an HF backbone plus a task head, and the head alone as a judge.

The head is a pooler (dense + tanh, as BERT's pooler and DeBERTa's ContextPooler) followed by
dropout and a linear classifier. It reads final-layer states at positions that get snapped to
senses later, never at special tokens:
  first_token  the state of the first non-special token (the reference drops CLS and pools
               positions 1: through DeBERTa's ContextPooler, which takes the first of them);
  mean         the mean over non-special, non-padding tokens.
`head_logits(head, states, attention_mask, special_mask)` is the one way logits are computed,
in training and when judging any system's (snapped) states: the teacher's, a student's.

On disk (save_task_model) a tuned teacher is a model folder any stage can use as
model.teacher: the backbone's save_pretrained files and the tokenizer, plus
  task_head.safetensors        the head's weights (dense, classifier)
  task_head.json               format, version, task, labels (id order), pooling, d, dropout, ...
  task_head_check.safetensors  a few validation examples (input_ids, attention_mask, special_mask)
                               and the logits the trained model gave them, to check a reload against.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dist_sense.model.teacher import TeacherError, resolve_model_path

HEAD_FORMAT = "dist_sense.task_head"
HEAD_VERSION = 1
HEAD_WEIGHTS = "task_head.safetensors"
HEAD_INFO = "task_head.json"
HEAD_CHECK = "task_head_check.safetensors"
POOLINGS = ("first_token", "mean")
DEFAULT_DROPOUT = 0.1
"""Head dropout when the backbone's config names none (hidden_dropout_prob / pooler_dropout)."""


class TaskHeadError(TeacherError):
    """A task head that is missing, foreign or does not fit its backbone; the message names the file."""


class TaskHead(nn.Module):
    """Pooler (dense + tanh), dropout and classifier over `len(labels)` classes; forward = head_logits."""

    def __init__(self, d: int, labels: list, pooling: str, dropout: float = DEFAULT_DROPOUT, info: dict | None = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}: use one of {', '.join(POOLINGS)}")
        self.dense = nn.Linear(d, d)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(d, len(labels))
        self.pooling, self.labels, self.d = pooling, list(labels), int(d)
        self.info = dict(info or {})

    def forward(self, states, attention_mask, special_mask):
        return head_logits(self, states, attention_mask, special_mask)


def pool_states(states: torch.Tensor, attention_mask: torch.Tensor, special_mask: torch.Tensor, pooling: str):
    """[B, d] from states [B, L, d]: the first content token's state, or the mean over content tokens
    (content: attended and not special). A row without any content token is refused."""
    content = attention_mask.bool() & ~special_mask.bool()
    empty = (~content.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty[:10]} of the batch hold only special or padding tokens: the head has "
                         f"nothing to pool there")
    if pooling == "first_token":
        first = content.int().argmax(dim=1)  # argmax gives the first of the maxima: the first content position
        return states[torch.arange(states.shape[0], device=states.device), first]
    if pooling == "mean":
        weights = content.to(states.dtype).unsqueeze(-1)
        return (states * weights).sum(dim=1) / weights.sum(dim=1)
    raise ValueError(f"pooling={pooling!r}: use one of {', '.join(POOLINGS)}")


def head_logits(head: TaskHead, states: torch.Tensor, attention_mask: torch.Tensor, special_mask: torch.Tensor):
    """[B, classes] logits of `head` on states [B, L, d] (any system's; cast to the head's dtype):
    pool, then pooled_logits. Dropout acts only in train mode."""
    return pooled_logits(head, pool_states(states.to(head.dense.weight.dtype), attention_mask, special_mask,
                                           head.pooling))


def pooled_logits(head: TaskHead, pooled: torch.Tensor) -> torch.Tensor:
    """[B, classes] logits of `head` on already pooled states [B, d]: classifier(dropout(tanh(dense(pooled))))."""
    pooled = pooled.to(head.dense.weight.dtype)
    return head.classifier(head.dropout(torch.tanh(head.dense(pooled))))


class TaskModel(nn.Module):
    """forward(input_ids, attention_mask, special_mask) -> logits: the backbone's last states through the head.

    The backbone is an HF model (the teacher) or a model.student.Student (the directly fine-tuned
    student baseline), whose forward already gives states at the teacher's width."""

    def __init__(self, backbone: nn.Module, head: TaskHead):
        super().__init__()
        self.backbone, self.head = backbone, head
        self._student = _is_student(backbone)  # decided once, not on every forward

    def states(self, input_ids, attention_mask):
        if self._student:
            return self.backbone(input_ids, attention_mask)
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state

    def forward(self, input_ids, attention_mask, special_mask):
        return self.head(self.states(input_ids, attention_mask), attention_mask, special_mask)


def _is_student(module: nn.Module) -> bool:
    from dist_sense.model.student import Student

    return isinstance(module, Student)


def _head_dropout(config) -> float:
    named = (getattr(config, "pooler_dropout", None), getattr(config, "hidden_dropout_prob", None))
    return float(next((p for p in named if isinstance(p, (int, float))), DEFAULT_DROPOUT))


def build_student_task_model(student: nn.Module, labels: list, pooling: str, info: dict | None = None) -> TaskModel:
    """A model.student.Student with a freshly initialised head over its teacher-width states (seed torch first)."""
    head = TaskHead(student.teacher_d, labels, pooling, _head_dropout(student.backbone.config),
                    {**(info or {}), "base_student": str(student.info.get("source"))})
    return TaskModel(student, head)


def build_task_model(teacher: str, labels: list, pooling: str, info: dict | None = None) -> TaskModel:
    """The teacher at `teacher` (model.teacher) in fp32 with a freshly initialised head (seed torch first)."""
    from transformers import AutoModel

    path = resolve_model_path(teacher)
    try:
        backbone = AutoModel.from_pretrained(path, dtype=torch.float32)
    except Exception as err:
        raise TeacherError(f"model.teacher={teacher}: weights do not load: {err}") from None
    # The head has its own pooler; a backbone's (BERT's) stays as it is, saved with it, and untrained:
    # it never sees a gradient, which ZeRO-2 expects of every trained parameter.
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler.requires_grad_(False)
    config = backbone.config
    d = int(getattr(config, "hidden_size", 0) or 0)
    if d <= 0:
        raise TeacherError(f"model.teacher={teacher}: its config has no hidden_size, so no head can be sized")
    head = TaskHead(d, labels, pooling, _head_dropout(config), {**(info or {}), "base_teacher": str(path)})
    return TaskModel(backbone, head)


def unwrap(module: nn.Module) -> TaskModel:
    """The TaskModel inside a DeepSpeed engine (or the module itself)."""
    while not isinstance(module, TaskModel) and hasattr(module, "module"):
        module = module.module
    if not isinstance(module, TaskModel):
        raise TypeError(f"expected a TaskModel, got {type(module).__name__}")
    return module


def head_description(head: TaskHead, extra: dict | None = None) -> dict:
    """task_head.json's content."""
    return {"format": HEAD_FORMAT, "version": HEAD_VERSION, **head.info, "labels": head.labels,
            "pooling": head.pooling, "d": head.d, "n_classes": len(head.labels), "dropout": head.dropout.p,
            **(extra or {})}


def save_task_model(module: nn.Module, out_dir, tokenizer=None, extra: dict | None = None,
                    check: dict | None = None) -> Path:
    """Write the backbone (save_pretrained; a student through model.student.save_student), the tokenizer,
    task_head.safetensors, task_head.json and, given `check` (tensors: inputs and the logits they gave),
    task_head_check.safetensors into `out_dir`."""
    from safetensors.torch import save_file

    from dist_sense.model.student import save_student

    model = unwrap(module)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model._student:
        save_student(model.backbone, out, tokenizer)
    else:
        model.backbone.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.head.state_dict().items()}
    save_file(state, out / HEAD_WEIGHTS, metadata={"format": HEAD_FORMAT, "version": str(HEAD_VERSION)})
    if check is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in check.items()}, out / HEAD_CHECK)
    (out / HEAD_INFO).write_text(json.dumps(head_description(model.head, extra), indent=2) + "\n")
    return out


def read_head_info(directory) -> dict:
    """task_head.json of a tuned teacher; TaskHeadError naming the file when it is missing or foreign."""
    path = Path(directory) / HEAD_INFO
    if not path.is_file():
        raise TaskHeadError(f"{path}: not found; {directory} is not a fine-tuned teacher (the finetune stage "
                            f"writes OUTPUT/final with it): run launcher/finetune.py and use its final/ folder")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise TaskHeadError(f"{path}: unreadable ({err}); rerun the finetune stage to write it again") from None
    if not isinstance(info, dict) or info.get("format") != HEAD_FORMAT or info.get("version") != HEAD_VERSION:
        found = (info.get("format"), info.get("version")) if isinstance(info, dict) else type(info).__name__
        raise TaskHeadError(f"{path}: format {found}, expected ({HEAD_FORMAT!r}, {HEAD_VERSION}): not a task "
                            f"head this dist_sense can read; rerun the finetune stage")
    for key in ("labels", "pooling", "d"):
        if key not in info:
            raise TaskHeadError(f"{path}: lacks {key!r}; the file is damaged: rerun the finetune stage")
    return info


def load_task_head(directory, device: str | torch.device = "cpu") -> TaskHead:
    """The frozen head of the tuned teacher in `directory`, in eval mode on `device`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    info = read_head_info(directory)
    path = Path(directory) / HEAD_WEIGHTS
    if not path.is_file():
        raise TaskHeadError(f"{path}: not found, though {Path(directory) / HEAD_INFO} is there: the tuned teacher "
                            f"is incomplete; rerun the finetune stage")
    try:
        state = load_file(path)
    except (OSError, SafetensorError) as err:
        raise TaskHeadError(f"{path}: not a readable safetensors file ({err}); rerun the finetune stage") from None
    d, n = int(info["d"]), len(info["labels"])
    try:
        head = TaskHead(d, info["labels"], info["pooling"], float(info.get("dropout", DEFAULT_DROPOUT)),
                        {k: v for k, v in info.items() if k in ("task", "base_teacher")})
    except ValueError as err:
        raise TaskHeadError(f"{Path(directory) / HEAD_INFO}: {err}") from None
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        raise TaskHeadError(f"{path}: tensors {found} do not make a head of d={d} over {n} classes as "
                            f"{Path(directory) / HEAD_INFO} says ({expected}): the two files belong to different runs")
    head.load_state_dict(state)
    return head.to(device).eval().requires_grad_(False)


def load_task_model(directory, device: str | torch.device = "cpu") -> TaskModel:
    """The tuned model in `directory` (backbone and head; a tuned teacher or a directly tuned student),
    frozen, in eval mode on `device`."""
    from transformers import AutoModel

    from dist_sense.model.student import INFO_NAME, load_student

    head = load_task_head(directory, device)
    if (Path(directory) / INFO_NAME).is_file():
        student = load_student(directory, device)
        if student.teacher_d != head.d:
            raise TaskHeadError(f"{Path(directory) / HEAD_INFO}: head of d={head.d}, but the student in {directory} "
                                f"maps to {student.teacher_d}: the head belongs to another model")
        return TaskModel(student.requires_grad_(False), head).eval()
    try:
        backbone = AutoModel.from_pretrained(directory, dtype=torch.float32)
    except Exception as err:
        raise TaskHeadError(f"{directory}: the tuned teacher's backbone does not load: {err}") from None
    width = int(getattr(backbone.config, "hidden_size", 0) or 0)
    if width != head.d:
        raise TaskHeadError(f"{Path(directory) / HEAD_INFO}: head of d={head.d}, but the backbone in {directory} "
                            f"is {width} wide: the head belongs to another model")
    return TaskModel(backbone.to(device).eval().requires_grad_(False), head).eval()
