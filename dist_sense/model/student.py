"""The student: an HF backbone plus a head that maps its states to the teacher's width.

Two ways to build one (distill.init):
  truncate  the teacher's first `distill.layers` layers, with their weights (decoders keep
            their final norm); the width already matches, so the head is the identity.
  model     a separate model (`distill.student_model`: a directory with weights, a directory
            with only config.json, or a config.json file -> random init) plus a trainable
            nn.Linear(student_d, teacher_d). A previously saved student directory works
            too; its head must already map to teacher_d.

On disk (save_student): the backbone's save_pretrained files, the tokenizer, head.pt (the
head's state dict; empty for the identity) and student.json (init, layers, widths, head kind).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dist_sense.config import ConfigError, RunConfig
from dist_sense.model.loading import forward_mask, mark_bidirectional, teacher_path
from dist_sense.model.teacher import TeacherError, check_max_length

STUDENT_FORMAT = "dist_sense.student"
STUDENT_VERSION = 1
INFO_NAME = "student.json"
HEAD_NAME = "head.pt"


class StudentError(ConfigError):
    """A student that cannot be built, loaded or mapped to the teacher's width; the message names it."""


class Student(nn.Module):
    """forward(input_ids, attention_mask) -> [B, L, teacher_d] states."""

    def __init__(self, backbone: nn.Module, head: nn.Module, info: dict):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.info = dict(info)

    @property
    def teacher_d(self) -> int:
        return int(self.info["teacher_d"])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=forward_mask(self.backbone, attention_mask),
                            return_dict=True)
        return self.head(out.last_hidden_state)


def build_student(cfg: RunConfig, teacher_d: int) -> Student:
    """The student of cfg.distill, mapping to `teacher_d` (the dictionary's width).

    Refused when corpus.max_length (the labelled windows' length) is beyond its positions.
    """
    if cfg.distill.init == "truncate":
        student = _truncated_teacher(cfg, teacher_d)
    else:
        student = _separate_model(cfg.distill.student_model, teacher_d)
    check_max_length(cfg.corpus.max_length, student.backbone.config, f"student {student.info.get('source')}",
                     StudentError)
    return student


def _truncated_teacher(cfg: RunConfig, teacher_d: int) -> Student:
    from transformers import AutoConfig, AutoModel

    path = teacher_path(cfg.model)
    hf_config = _load_config(AutoConfig, path, f"model.teacher={cfg.model.teacher}")
    if cfg.model.bidirectional:
        mark_bidirectional(hf_config)  # saved with the student: it runs as its teacher did
    n_layers, layers = int(getattr(hf_config, "num_hidden_layers", 0)), cfg.distill.layers
    if layers > n_layers:
        raise StudentError(f"distill.layers={layers}: the teacher {path} has only {n_layers} layers")
    if int(hf_config.hidden_size) != teacher_d:
        raise StudentError(f"distill.init=truncate: the teacher {path} is {hf_config.hidden_size} wide but the "
                           f"dictionary is {teacher_d} wide; build the dictionary from this teacher or use init=model")
    hf_config.num_hidden_layers = layers
    # Per-layer settings (sliding/full attention...) must shrink with the layer count.
    if isinstance(getattr(hf_config, "layer_types", None), list):
        hf_config.layer_types = hf_config.layer_types[:layers]
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the dropped layers are "unexpected" keys by design; we check what matters
    try:
        # from_pretrained keeps the checkpoint's first `layers` layers and drops the rest.
        backbone, loading = AutoModel.from_pretrained(path, config=hf_config, dtype=torch.float32, output_loading_info=True)
    except Exception as err:
        raise TeacherError(f"model.teacher={cfg.model.teacher}: weights do not load: {err}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = [k for k in loading.get("missing_keys", []) if "pooler" not in k]
    if missing or loading.get("mismatched_keys"):
        raise StudentError(f"model.teacher={cfg.model.teacher}: the truncated student would start with random "
                           f"weights for {sorted(missing or loading['mismatched_keys'])[:5]}")
    info = {"init": "truncate", "layers": layers, "teacher_layers": n_layers, "student_d": teacher_d,
            "teacher_d": teacher_d, "head": "identity", "source": str(path)}
    return Student(_without_pooler(backbone), nn.Identity(), info)


def _separate_model(spec: str, teacher_d: int) -> Student:
    from transformers import AutoConfig, AutoModel

    path = Path(spec)
    key = f"distill.student_model={spec}"
    if (path / INFO_NAME).is_file():  # a student saved earlier: continue from it, head included
        student = load_student(path)
        if student.teacher_d != teacher_d:
            raise StudentError(f"{key}: its head maps to {student.teacher_d} dimensions, the dictionary has "
                               f"{teacher_d}: a saved head cannot be re-mapped; start from its backbone instead")
        return student
    if path.is_file() and path.suffix == ".json":
        backbone = _from_config(AutoConfig, AutoModel, path, key)
    elif (path / "config.json").is_file():
        has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
        if has_weights:
            try:
                backbone = AutoModel.from_pretrained(path, dtype=torch.float32)
            except Exception as err:
                raise StudentError(f"{key}: weights do not load: {err}") from None
        else:
            backbone = _from_config(AutoConfig, AutoModel, path / "config.json", key)
    else:
        raise StudentError(f"{key}: neither a model directory (no {path / 'config.json'}) nor a config.json file")
    student_d = int(getattr(backbone.config, "hidden_size", 0) or 0)
    if student_d <= 0:
        raise StudentError(f"{key}: its config has no hidden_size, so its width cannot be mapped to {teacher_d}")
    info = {"init": "model", "layers": int(getattr(backbone.config, "num_hidden_layers", 0)), "student_d": student_d,
            "teacher_d": teacher_d, "head": "linear", "source": str(path)}
    return Student(_without_pooler(backbone), nn.Linear(student_d, teacher_d), info)


def _load_config(auto_config, path: Path, key: str):
    try:
        return auto_config.from_pretrained(path)
    except Exception as err:
        raise StudentError(f"{key}: config does not load: {err}") from None


def _from_config(auto_config, auto_model, config_file: Path, key: str):
    try:
        hf_config = auto_config.from_pretrained(config_file.parent if config_file.name == "config.json" else config_file)
        return auto_model.from_config(hf_config, dtype=torch.float32)
    except Exception as err:
        raise StudentError(f"{key}: cannot build a model from {config_file}: {err}") from None


def _without_pooler(backbone: nn.Module) -> nn.Module:
    # BERT-style poolers never see a gradient here; ZeRO-2 expects every trainable parameter to get one.
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None
    return backbone


def check_vocabulary(student: Student, tokenizer) -> None:
    """The student must embed every id the teacher's tokenizer produces."""
    vocab = int(getattr(student.backbone.config, "vocab_size", 0) or 0)
    if vocab < len(tokenizer):
        raise StudentError(f"student {student.info.get('source')}: vocab_size={vocab} but the teacher's tokenizer "
                           f"has {len(tokenizer)} ids; the student must share the teacher's tokenizer")


def unwrap(module: nn.Module) -> Student:
    """The Student inside a DeepSpeed engine (or the module itself)."""
    while not isinstance(module, Student) and hasattr(module, "module"):
        module = module.module
    if not isinstance(module, Student):
        raise TypeError(f"expected a Student, got {type(module).__name__}")
    return module


def save_student(module: nn.Module, out_dir, tokenizer=None, extra: dict | None = None) -> Path:
    """Write the backbone (save_pretrained), the tokenizer, head.pt and student.json into `out_dir`."""
    student = unwrap(module)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    student.backbone.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    head_state = {k: v.detach().cpu().clone() for k, v in student.head.state_dict().items()}
    torch.save(head_state, out / HEAD_NAME)
    info = {"format": STUDENT_FORMAT, "version": STUDENT_VERSION, **student.info, **(extra or {})}
    (out / INFO_NAME).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out


def load_student(directory, device: str | torch.device = "cpu") -> Student:
    """A student written by save_student, in eval mode on `device`."""
    from transformers import AutoModel

    directory = Path(directory)
    info = _read_info(directory)
    try:
        backbone = AutoModel.from_pretrained(directory, dtype=torch.float32)
    except Exception as err:
        raise StudentError(f"{directory}: the student's backbone does not load: {err}") from None
    head_path = directory / HEAD_NAME
    if not head_path.is_file():
        raise StudentError(f"{head_path}: missing; the student directory is incomplete")
    head_state = torch.load(head_path, map_location="cpu", weights_only=True)
    head: nn.Module = nn.Identity()
    if info.get("head") == "linear":
        head = nn.Linear(int(info["student_d"]), int(info["teacher_d"]))
        weight = head_state.get("weight")
        if weight is None or tuple(weight.shape) != (int(info["teacher_d"]), int(info["student_d"])):
            found = None if weight is None else tuple(weight.shape)
            raise StudentError(f"{head_path}: head weight {found} does not map student_d={info['student_d']} "
                               f"to teacher_d={info['teacher_d']} as {directory / INFO_NAME} says")
        head.load_state_dict(head_state)
    info = {k: v for k, v in info.items() if k not in ("format", "version")}
    return Student(_without_pooler(backbone), head, info).to(device).eval()


def check_dictionary(student: "Student", student_path: Path, dictionary_dir: Path) -> None:
    """Refuse a student with a dictionary other than the one it was trained against: its sense
    logits would score other senses. Students saved before run identities are let through."""
    from dist_sense.formats.manifest import file_fingerprint

    made = (student.info.get("identity") or {}).get("dictionary_fingerprint")
    index = Path(dictionary_dir) / "index.json"
    found = file_fingerprint([index]) if index.is_file() else None
    if made and found and made != found:
        raise StudentError(f"{student_path}: trained against dictionary fingerprint {made}, but {index} has {found} "
                           f"(the dictionary was rebuilt since): rerun label and distill, or use the student with "
                           f"the dictionary it was trained against")


def _read_info(directory: Path) -> dict:
    path = directory / INFO_NAME
    if not path.is_file():
        raise StudentError(f"{path}: not found; {directory} is not a saved student (save_student writes it)")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StudentError(f"{path}: not valid JSON ({err})") from None
    if info.get("format") != STUDENT_FORMAT or info.get("version") != STUDENT_VERSION:
        raise StudentError(f"{path}: format {info.get('format')!r} version {info.get('version')!r}, "
                           f"expected {STUDENT_FORMAT!r} version {STUDENT_VERSION}")
    return info
