"""Labelled tasks (the GLUE setting): train / validation / test files with a text, an optional
second text and a label per row, read through `datasets` like the corpus (formats/corpus.py).

`load_task(cfg.task)` reads every split, checks it and maps the labels to ids: the label order
is the sorted labels of the train split (strings or integers), recorded in `Task.labels`, so
the id of a label never depends on row order. Each refusal is a `TaskError` naming the file,
the field and the value: a missing split file, a missing column (the columns are listed), a
text that is not a string or is blank, a label that is neither string nor integer, a label in
validation or test that train never has, a train split of one class, an empty split.
`encode_split` tokenises a split once (special tokens marked); `collate` pads a batch of it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_sense.config.tasks import TaskConfig
from dist_sense.formats.corpus import CorpusError, _data_files, _load_files
from dist_sense.formats.identity import corpus_fingerprint

SHOWN_LABELS = 12
"""Labels listed in an error message before it says how many more there are."""


class TaskError(CorpusError):
    """A task file, field or value that cannot be used; the message names it and the way on."""


@dataclass
class TaskSplit:
    """One split with its labels mapped to ids."""

    name: str
    """train, validation or test."""
    path: Path
    texts: list[str]
    pairs: list[str] | None
    """The second texts of a sentence-pair task (None for single sentences)."""
    label_ids: np.ndarray
    """int64 [n]: index into Task.labels."""

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class Task:
    name: str
    labels: list
    """Label values in id order: the sorted distinct labels of the train split."""
    splits: dict[str, TaskSplit]

    @property
    def n_classes(self) -> int:
        return len(self.labels)


def load_task(cfg: TaskConfig) -> Task:
    """Every split of `cfg` (train and validation required, test when set), checked, labels as ids."""
    raw = {name: _read_split(name, path, cfg) for name, path in cfg.split_paths().items()}
    train_path, train_labels = raw["train"][0], raw["train"][3]
    labels = sorted(set(train_labels))
    if len(labels) < 2:
        raise TaskError(f"{train_path}: every one of its {len(train_labels)} examples has label {labels[0]!r} "
                        f"(task.label_field={cfg.label_field!r}): a classifier needs at least two classes in the "
                        f"train split; check the file and the label field")
    ids = {label: i for i, label in enumerate(labels)}
    splits = {}
    for name, (path, texts, pairs, values) in raw.items():
        splits[name] = TaskSplit(name, path, texts, pairs, _label_ids(values, ids, labels, path, cfg, train_path))
    return Task(cfg.name, labels, splits)


def task_fingerprints(cfg: TaskConfig) -> dict[str, str]:
    """{split: content fingerprint of its file(s)}: what a tuned teacher's identity records of its data."""
    return {name: corpus_fingerprint(path) for name, path in cfg.split_paths().items()}


def _label_ids(values: list, ids: dict, labels: list, path: Path, cfg: TaskConfig, train_path: Path) -> np.ndarray:
    out = np.empty(len(values), dtype=np.int64)
    for row, value in enumerate(values):
        if value not in ids:
            shown = ", ".join(repr(v) for v in labels[:SHOWN_LABELS])
            more = f" and {len(labels) - SHOWN_LABELS} more" if len(labels) > SHOWN_LABELS else ""
            raise TaskError(f"{path}: label {value!r} ({type(value).__name__}) in row {row} (field "
                            f"{cfg.label_field!r}) never occurs in the train split {train_path}, whose labels are "
                            f"{shown}{more}: fix the label, or add examples of it to the train split")
        out[row] = ids[value]
    return out


# ----------------------------------------------------------------------------- reading one split


def _read_split(split: str, path: str, cfg: TaskConfig) -> tuple[Path, list[str], list[str] | None, list]:
    """(path, texts, second texts or None, raw labels) of one split file, every value checked."""
    root = Path(path)
    if not path:
        raise TaskError(f"task.{split}: not set; give the {split} split's file (.jsonl, .json, .csv or .parquet)")
    if not root.exists():
        raise TaskError(f"task.{split}={path}: the {split} split's file does not exist: set task.{split} to "
                        f"the file holding it")
    if root.is_file() and root.stat().st_size == 0:
        raise TaskError(f"{root}: the {split} split (task.{split}) is an empty file: it holds no examples")
    try:
        files, builder = _data_files(root)
    except CorpusError as err:
        raise TaskError(f"task.{split}: {err}") from None
    if builder == "text":
        raise TaskError(f"{root}: plain text has no label column; write the {split} split as .jsonl, .csv or "
                        f".parquet with fields {cfg.text_field!r} and {cfg.label_field!r}")
    dataset = _load_files(root, files, builder)
    wanted = [("task.text_field", cfg.text_field), ("task.text_pair_field", cfg.text_pair_field),
              ("task.label_field", cfg.label_field)]
    for key, column in wanted:
        if column and column not in dataset.column_names:
            raise TaskError(f"{root}: no field {column!r} ({key}) in the {split} split; its columns are "
                            f"{dataset.column_names}: set {key} to the column that holds it")
    if len(dataset) == 0:
        raise TaskError(f"{root}: the {split} split (task.{split}) holds no examples")
    texts = _texts(dataset[cfg.text_field], root, cfg.text_field, blank_ok=False)
    pairs = _texts(dataset[cfg.text_pair_field], root, cfg.text_pair_field, blank_ok=True) if cfg.text_pair_field else None
    labels = dataset[cfg.label_field]
    for row, value in enumerate(labels):
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise TaskError(f"{root}: label {str(value)[:60]!r} in row {row} (field {cfg.label_field!r}) is "
                            f"{type(value).__name__}: every label must be a string or an integer")
    return root, texts, pairs, list(labels)


def _texts(values: list, root: Path, field: str, blank_ok: bool) -> list[str]:
    for row, value in enumerate(values):
        if not isinstance(value, str):
            raise TaskError(f"{root}: field {field!r} in row {row} is {type(value).__name__} {repr(value)[:60]}, "
                            f"not text: every example's {field!r} must be a string")
        if not blank_ok and not value.strip():
            raise TaskError(f"{root}: field {field!r} in row {row} is blank: every example needs some text "
                            f"(remove the row or fill it in)")
    return list(values)


# ----------------------------------------------------------------------------- model inputs


@dataclass
class EncodedSplit:
    """A split tokenised once: per example its ids and which of them the tokenizer added."""

    input_ids: list[np.ndarray]
    """int64 [L_i] ids with the tokenizer's special tokens (a pair: both texts and their separators)."""
    special: list[np.ndarray]
    """bool [L_i]: True where the tokenizer added the token."""
    label_ids: np.ndarray
    truncated: int
    """Examples cut to max_length."""

    def __len__(self) -> int:
        return len(self.input_ids)


ENCODE_BATCH = 1024
"""Examples per tokenizer call."""


def encode_split(split: TaskSplit, tokenizer, max_length: int) -> EncodedSplit:
    """Token ids and special-token marks of every example, cut to `max_length` (a pair: the longer text first)."""
    ids, special, truncated = [], [], 0
    for begin in range(0, len(split), ENCODE_BATCH):
        texts = split.texts[begin:begin + ENCODE_BATCH]
        pairs = split.pairs[begin:begin + ENCODE_BATCH] if split.pairs is not None else None
        full = tokenizer(texts, pairs, add_special_tokens=True, return_length=True, verbose=False)["length"]
        encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length, add_special_tokens=True,
                            return_special_tokens_mask=True, verbose=False)
        for offset, (row, marks) in enumerate(zip(encoded["input_ids"], encoded["special_tokens_mask"])):
            marks = np.asarray(marks, dtype=bool)
            if marks.all():
                raise TaskError(f"{split.path}: row {begin + offset} keeps no token of its text within "
                                f"finetune.max_length={max_length} (only special tokens): raise finetune.max_length")
            ids.append(np.asarray(row, dtype=np.int64))
            special.append(marks)
        truncated += sum(int(n > max_length) for n in full)
    return EncodedSplit(ids, special, split.label_ids, truncated)


def collate(encoded: EncodedSplit, rows, pad_id: int) -> dict:
    """The examples `rows` as LongTensors [B, longest] (input_ids, attention_mask, special_mask, right-padded;
    padding counts as special) and labels [B]."""
    import torch

    rows = list(rows)
    longest = max(len(encoded.input_ids[r]) for r in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    special_mask = torch.ones((len(rows), longest), dtype=torch.long)
    for at, row in enumerate(rows):
        n = len(encoded.input_ids[row])
        input_ids[at, :n] = torch.from_numpy(encoded.input_ids[row])
        attention_mask[at, :n] = 1
        special_mask[at, :n] = torch.from_numpy(encoded.special[row].astype(np.int64))
    labels = torch.from_numpy(encoded.label_ids[rows].astype(np.int64))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "special_mask": special_mask, "labels": labels}
