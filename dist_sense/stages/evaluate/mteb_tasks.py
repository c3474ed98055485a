"""The LLM setting's judge: MTEB classification, run by the `mteb` package itself on local labelled data.

Each entry of eval.mteb_tasks is a folder holding train.jsonl and test.jsonl, one
{"text": ..., "label": ...} object per line, with fixed splits. Each becomes an mteb
classification task whose data is read from those files (nothing is fetched), and every
system of probes.SYSTEMS is scored by `mteb.evaluate` through MtebSystem: mean pooling
over a text's own tokens (not special, not model.instruction's), of the continuous
states or of the snapped senses. The scores go to RUN/eval/mteb/<task>/<system>.json and
to metrics.json as mteb.<task>.<system> (mteb's main score, accuracy).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dist_sense import comm
from dist_sense.formats.manifest import atomic_write_json
from dist_sense.stages.evaluate.probes import SYSTEMS, EvalError

log = comm.get_logger("dist_sense.mteb")

MTEB_SPLITS = ("train", "test")


def read_task(folder: str | Path) -> dict:
    """{split: (texts, label ids)} of a local task folder; labels numbered by their sorted train values."""
    folder = Path(folder)
    rows = {}
    for split in MTEB_SPLITS:
        path = folder / f"{split}.jsonl"
        if not path.is_file():
            raise EvalError(f"eval.mteb_tasks: {path} not found; a task folder needs {' and '.join(MTEB_SPLITS)}"
                            ".jsonl")
        rows[split] = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                rows[split].append((str(item["text"]), item["label"]))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise EvalError(f"{path}:{number}: not a {{\"text\", \"label\"}} object ({err})") from None
        if not rows[split]:
            raise EvalError(f"{path}: no examples")
    classes = sorted({label for _, label in rows["train"]}, key=str)
    if len(classes) < 2:
        raise EvalError(f"{folder / 'train.jsonl'}: a single class {classes}; classification needs at least two")
    number_of = {label: i for i, label in enumerate(classes)}
    unseen = sorted({str(label) for _, label in rows["test"]} - {str(c) for c in classes})
    if unseen:
        raise EvalError(f"{folder / 'test.jsonl'}: labels {unseen[:5]} never occur in train.jsonl")
    return {split: ([t for t, _ in items], [number_of[label] for _, label in items]) for split, items in rows.items()}


def local_task(name: str, data: dict):
    """An mteb classification task over `data` (read_task's), loading nothing from a hub."""
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.classification import AbsTaskClassification
    from mteb.abstasks.task_metadata import TaskMetadata

    metadata = TaskMetadata(
        type="Classification", name=name, main_score="accuracy", description=f"local task {name} (dist_sense)",
        reference=None, dataset={"path": f"local/{name}", "revision": "local"}, category="t2t", eval_splits=["test"],
        eval_langs=["eng-Latn"], date=None, dialect=[], domains=[], task_subtypes=[], license="not specified",
        annotations_creators=None, modalities=["text"], sample_creation=None, bibtex_citation="")

    def load_data(self, num_proc=None, **kwargs) -> None:
        self.dataset = DatasetDict({split: Dataset.from_dict({"text": texts, "label": labels})
                                    for split, (texts, labels) in data.items()})
        self.data_loaded = True

    return type(f"Local{name}", (AbsTaskClassification,), {"metadata": metadata, "load_data": load_data})()


class MtebSystem:
    """One system as an mteb encoder: SenseEncoder's mean-pooled continuous states or snapped senses."""

    def __init__(self, encoder, name: str, kind: str, batch_size: int):
        from mteb.models.model_meta import ModelMeta

        self.encoder, self.kind, self.batch_size = encoder, kind, batch_size
        self.mteb_model_meta = ModelMeta.create_empty().model_copy(update={"name": f"dist_sense/{name}",
                                                                           "revision": "local"})

    def encode(self, inputs, *, task_metadata=None, hf_split=None, hf_subset=None, prompt_type=None, **kwargs):
        texts = [text for batch in inputs for text in batch["text"]]
        out = self.encoder.encode(texts, batch_size=self.batch_size)
        pick = (lambda e: e.sentence_sense_embedding) if self.kind == "senses" else (lambda e: e.sentence_embedding)
        return np.stack([np.asarray(pick(e), dtype=np.float32) for e in out]) if out else np.zeros((0, 1), np.float32)

    def similarity(self, a, b):
        a, b = (np.asarray(x, dtype=np.float32) for x in (a, b))
        return _unit(a) @ _unit(b).T

    def similarity_pairwise(self, a, b):
        return (_unit(np.asarray(a, np.float32)) * _unit(np.asarray(b, np.float32))).sum(-1)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def mteb_metrics(cfg, encoders: dict, notes: dict, out_dir: Path) -> dict:
    """mteb.<task>.<system>: mteb's accuracy for every task of eval.mteb_tasks and every system with an encoder."""
    if not cfg.eval.mteb_tasks:
        return {}
    import mteb

    metrics, tasks = {}, [(Path(f).name, read_task(f)) for f in cfg.eval.mteb_tasks]  # all read before any model runs
    for name, data in tasks:
        for system, (source, kind) in SYSTEMS.items():
            if encoders.get(source) is None:
                metrics[f"mteb.{name}.{system}"] = None
                continue
            result = mteb.evaluate(MtebSystem(encoders[source], system, kind, cfg.eval.batch_size),
                                   [local_task(name, data)], cache=None, show_progress_bar=False)
            task_result = result.task_results[0]
            metrics[f"mteb.{name}.{system}"] = float(task_result.get_score())
            # mteb's own record (dates included, as text)
            atomic_write_json(out_dir / "mteb" / name / f"{system}.json",
                              json.loads(json.dumps(task_result.to_dict(), default=str)))
            log.info("mteb %s %s: accuracy %.4f", name, system, metrics[f"mteb.{name}.{system}"])
    notes["mteb"] = {name: {"train": len(data["train"][0]), "test": len(data["test"][0])} for name, data in tasks}
    return metrics
