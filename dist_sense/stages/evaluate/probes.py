"""Downstream probes of evaluation: sentence classification and word-in-context, per system.

Every system is read through SenseEncoder.encode the same way; a system is an encoder plus
the embeddings it is judged on (continuous states or their snapped senses). Sentence tasks
score a logistic regression on mean-pooled embeddings (the reference's MTEB classification
protocol: scaled features, at most 100 solver iterations), by 5-fold cross-validation over
one seeded shuffle, so every example is tested once and the estimate's noise stays below
the differences it is read for; WiC scores the ROC AUC of the cosine between the
marked word's embeddings in two sentences. The teacher's senses are also scored under every
snapping similarity (dot, cos, l2), so the choice of eval.similarity is backed by numbers.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dist_sense import comm
from dist_sense.config import RunConfig
from dist_sense.formats.manifest import ManifestError
from dist_sense.model.encoder import EncodedText, SenseEncoder, SnapTable
from dist_sense.model.losses import SIMILARITIES

log = comm.get_logger("dist_sense.probes")

SYSTEMS = {  # system -> (the encoder that runs it, the embeddings it is judged on)
    "teacher": ("teacher", "continuous"),
    "teacher_senses": ("teacher", "senses"),
    "student_senses": ("student", "senses"),
    "student_no_kd": ("student_no_kd", "continuous"),
    "student_mse": ("student_mse", "continuous"),
}
PROBE_SEED = 0
"""Seed of the shuffle that splits probe examples into folds."""
PROBE_FOLDS = 5
PROBE_MAX_ITER = 100
"""MTEB's classification setting."""


class EvalError(ManifestError):
    """A model, probe file or held-out text that evaluation cannot use; the message names it."""


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def content_mask(encoded: EncodedText) -> np.ndarray:
    """True for tokens that cover text; the encoder gives special tokens the empty span (0, 0)."""
    spans = np.asarray(encoded.offsets, dtype=np.int64).reshape(-1, 2)
    return spans[:, 1] > spans[:, 0]


def encode_each(encoder: SenseEncoder, texts: list[str], batch_size: int, pick: Callable[[EncodedText, int], object]):
    """pick(encoded, index) for every text, encoding block by block so only the picked parts are kept."""
    kept, block = [], batch_size * 16  # encode sorts each block by length: big blocks, little padding
    for start in range(0, len(texts), block):
        batch = encoder.encode(texts[start : start + block], batch_size=batch_size)
        kept.extend(pick(encoded, start + i) for i, encoded in enumerate(batch))
    return kept


def read_jsonl(path: str, fields: tuple[str, ...], limit: int, what: str) -> list[dict]:
    """The first `limit` records of a jsonl file, each checked to hold `fields`."""
    file = Path(path)
    if not file.is_file():
        raise EvalError(f"{file}: {what} file not found")
    records = []
    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if len(records) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalError(f"{file}:{number}: not valid JSON ({err})") from None
            missing = [k for k in fields if not isinstance(record, dict) or k not in record]
            if missing:
                raise EvalError(f"{file}:{number}: {what} record lacks {missing} (expected keys {list(fields)})")
            records.append(record)
    if not records:
        raise EvalError(f"{file}: no {what} records")
    return records


def fit_logistic(features: np.ndarray, labels: np.ndarray, max_iter: int = PROBE_MAX_ITER):
    """A logistic regression on scaled features, fitted (an sklearn pipeline: .predict)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # Scaling first: raw hidden states of LMs have a few huge dimensions that stall the solver.
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    with warnings.catch_warnings():  # a capped solver is the protocol, not a fault
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(features, labels)
    return probe


def _fold_hits(features: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray) -> int:
    """Correct predictions on `test` of a logistic regression fitted on `train`."""
    probe = fit_logistic(features[train], labels[train])
    return int((probe.predict(features[test]) == labels[test]).sum())


def probe_accuracies(features: dict[str, np.ndarray], labels: list, source: str) -> dict[str, float]:
    """Cross-validated accuracy of a logistic regression per feature set: PROBE_FOLDS folds of
    one seeded shuffle (the same folds for every set), fits spread over the machine's cores."""
    from joblib import Parallel, delayed

    labels = np.asarray([str(label) for label in labels])
    if len(labels) < PROBE_FOLDS or len(np.unique(labels)) < 2:
        raise EvalError(f"{source}: a probe needs at least {PROBE_FOLDS} examples and two labels; "
                        f"found {len(labels)} examples, {len(np.unique(labels))} labels")
    order = np.random.default_rng(PROBE_SEED).permutation(len(labels))
    folds = [(np.setdiff1d(order, test), test) for test in np.array_split(order, PROBE_FOLDS)]
    if any(len(np.unique(labels[train])) < 2 for train, _ in folds):
        raise EvalError(f"{source}: a training fold has fewer than two labels; give the probe more examples")
    jobs = [(name, train, test) for name in features for train, test in folds]
    hits = Parallel(n_jobs=min(len(jobs), os.cpu_count() or 1))(
        delayed(_fold_hits)(features[name], labels, train, test) for name, train, test in jobs)
    totals = dict.fromkeys(features, 0)
    for (name, _, _), count in zip(jobs, hits):
        totals[name] += count
    return {name: total / len(labels) for name, total in totals.items()}


class Snappers:
    """The teacher's states snapped under every similarity, for the `snapping.*` metrics."""

    def __init__(self, encoder: SenseEncoder, skip: str = ""):
        # `skip`: the encoder's own similarity, whose senses every EncodedText already carries.
        self.tables = {sim: SnapTable(encoder.dictionary, sim, torch.device("cpu")) for sim in SIMILARITIES if sim != skip}

    def senses(self, encoded: EncodedText) -> dict[str, np.ndarray]:
        """similarity -> [n, d] sense embeddings of one encoded text."""
        ids, states = torch.as_tensor(encoded.token_ids), torch.as_tensor(encoded.hidden)
        return {sim: table.snap(ids, states)[1].numpy() for sim, table in self.tables.items()}


def _pooled(encoded: EncodedText, snappers: Snappers | None) -> dict:
    out = {"continuous": np.array(encoded.sentence_embedding), "senses": np.array(encoded.sentence_sense_embedding)}
    if snappers is not None:
        content = content_mask(encoded)
        for sim, embedded in snappers.senses(encoded).items():
            out[f"senses@{sim}"] = embedded[content].mean(0) if content.any() else np.zeros(embedded.shape[1], np.float32)
    return out


def sentence_probes(cfg: RunConfig, encoders: dict, notes: dict) -> dict:
    """downstream.<task>.<system> and snapping.<task>.<similarity> for every task of eval.probe_tasks."""
    metrics = {}
    snappers = Snappers(encoders["teacher"], skip=cfg.eval.similarity)
    for task in cfg.eval.probe_tasks:
        name, path = str(task).split("=", 1)
        if name == "wic" or f"downstream.{name}.teacher" in metrics:  # its keys would overwrite others
            raise EvalError(f"eval.probe_tasks: task name {name!r} is taken; give each task its own, not 'wic'")
        records = read_jsonl(path, ("text", "label"), cfg.eval.max_probe_examples, f"probe task {name!r}")
        texts, labels = [str(r["text"]) for r in records], [r["label"] for r in records]
        pooled = {}
        for encoder_name in dict.fromkeys(enc for enc, _ in SYSTEMS.values()):
            if encoders.get(encoder_name) is not None:
                extra = snappers if encoder_name == "teacher" else None
                rows = encode_each(encoders[encoder_name], texts, cfg.eval.batch_size, lambda e, _: _pooled(e, extra))
                pooled[encoder_name] = {kind: np.stack([r[kind] for r in rows]) for kind in rows[0]}
        features = {system: pooled[enc][kind] for system, (enc, kind) in SYSTEMS.items() if enc in pooled}
        # The configured similarity is teacher_senses itself; the others are scored beside it.
        others = [sim for sim in SIMILARITIES if sim != cfg.eval.similarity]
        features.update({f"snap@{sim}": pooled["teacher"][f"senses@{sim}"] for sim in others})
        scores = probe_accuracies(features, labels, path)
        for system in SYSTEMS:
            metrics[f"downstream.{name}.{system}"] = scores.get(system)
        for sim in SIMILARITIES:
            metrics[f"snapping.{name}.{sim}"] = scores["snap@" + sim] if sim in others else scores["teacher_senses"]
        notes["probes"][name] = {"path": path, "examples": len(records), "labels": len(set(map(str, labels)))}
        log.info("probe %s (%d examples): %s; teacher senses by similarity: %s", name, len(records),
                 ", ".join(f"{s} {metrics[f'downstream.{name}.{s}']}" for s in SYSTEMS),
                 ", ".join(f"{sim} {metrics[f'snapping.{name}.{sim}']:.4f}" for sim in SIMILARITIES))
    return metrics


def token_at(encoded: EncodedText, start: int, end: int) -> int:
    """Index of the first token overlapping the character span [start, end); -1 if none does."""
    for i, (a, b) in enumerate(encoded.offsets):
        if b > a and a < end and b > start:
            return i
    return -1


def wic_vectors(encoder: SenseEncoder, texts: list[str], spans: list[tuple[int, int]], batch_size: int, source: str,
                snappers: Snappers | None = None) -> dict:
    """kind -> [n, d] embeddings of each text's marked word (continuous, senses, senses@<similarity>)."""
    def pick(encoded: EncodedText, index: int):
        at = token_at(encoded, *spans[index])
        if at < 0:
            raise EvalError(f"{source}: pair {index // 2 + 1}: no token covers characters {spans[index]} of "
                            f"{texts[index][:60]!r} (wrong span, or cut at max_length)")
        # Copies: a view would keep the whole batch's arrays alive until the end.
        out = {"continuous": np.array(encoded.hidden[at]), "senses": np.array(encoded.sense_embeddings[at])}
        if snappers is not None:
            out.update({f"senses@{sim}": e[at] for sim, e in snappers.senses(encoded).items()})
        return out

    picked = encode_each(encoder, texts, batch_size, pick)
    return {kind: np.stack([p[kind] for p in picked]) for kind in picked[0]}


def wic_probe(cfg: RunConfig, encoders: dict, notes: dict) -> dict:
    """downstream.wic.<system> (and snapping.wic.<similarity>): ROC AUC of the word's cosine across the pair."""
    from sklearn.metrics import roc_auc_score

    path = cfg.eval.wic_path
    fields = ("text1", "start1", "end1", "text2", "start2", "end2", "same")
    pairs = read_jsonl(path, fields, cfg.eval.max_probe_examples, "WiC pair")
    same = np.array([bool(p["same"]) for p in pairs])
    if same.all() or not same.any():
        raise EvalError(f"{path}: WiC needs pairs with same=true and with same=false for an AUC")
    # Interleaved: text1 of pair i at 2i, text2 at 2i + 1.
    texts = [str(p[f"text{n}"]) for p in pairs for n in (1, 2)]
    spans = [(int(p[f"start{n}"]), int(p[f"end{n}"])) for p in pairs for n in (1, 2)]
    snappers = Snappers(encoders["teacher"], skip=cfg.eval.similarity)
    vectors = {name: wic_vectors(enc, texts, spans, cfg.eval.batch_size, path, snappers if name == "teacher" else None)
               for name, enc in encoders.items() if enc is not None}

    def auc(kinds: dict, kind: str) -> float:
        return float(roc_auc_score(same, row_cosine(kinds[kind][0::2], kinds[kind][1::2])))

    metrics = {f"downstream.wic.{system}": auc(vectors[enc], kind) if enc in vectors else None
               for system, (enc, kind) in SYSTEMS.items()}
    metrics.update({f"snapping.wic.{sim}": auc(vectors["teacher"], "senses" if sim == cfg.eval.similarity else f"senses@{sim}")
                    for sim in SIMILARITIES})
    words = [str(p["text1"])[int(p["start1"]) : int(p["end1"])].lower() for p in pairs]
    notes["wic"] = {"path": path, "pairs": len(pairs), "same": int(same.sum()),
                    "words": sorted(set(words), key=lambda w: (-words.count(w), w))}
    log.info("wic (%d pairs): %s", len(pairs), ", ".join(f"{s} {metrics[f'downstream.wic.{s}']}" for s in SYSTEMS))
    return metrics
