"""Stage 3a: the teacher labels the distillation corpus with its senses, once.

Every token of every window is snapped to its nearest sense (argmax over that token's
senses by dot, cos or l2); the sense index goes into RUN/labels/ shards as int16, -1
where the token is special or has no dictionary entry. Optional extras: top-k soft
targets at a temperature, and the teacher's states themselves (for the MSE baseline).
The student trainer then never runs the teacher. Lockstep, resume and manifest rules
are those of extraction (teacher_pass).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from dist_sense import comm
from dist_sense.config import RunConfig
from dist_sense.formats import corpus
from dist_sense.formats.dictionary import DictionaryError, SenseDictionary
from dist_sense.formats.identity import corpus_fingerprint
from dist_sense.formats.labels import LABELS_FORMAT, LABELS_VERSION
from dist_sense.formats.manifest import file_fingerprint, write_manifest
from dist_sense.formats.shards import npy_bytes
from dist_sense.model.teacher import Teacher
from dist_sense.stages.guard import finished_and_whole, open_stage
from dist_sense.stages.teacher_pass import gather_progress, merge_counters, run_pass

log = comm.get_logger("dist_sense.label")


def check_teacher_matches(dictionary: SenseDictionary, teacher: Teacher) -> None:
    """The dictionary's senses live in one teacher's space at one layer; refuse any other."""
    dictionary.check_tokenizer(teacher.tokenizer)
    meta = dictionary.meta
    for key, found in (("teacher_fingerprint", teacher.fingerprint), ("layer", teacher.layer), ("d", teacher.d)):
        expected = meta.get(key)
        if expected is not None and expected != found:
            raise DictionaryError(
                f"{dictionary.source}: built with {key}={expected}, but model.teacher={teacher.path} gives {found}; "
                "label with the teacher and layer the dictionary was built from"
            )


def soft_targets(scores: np.ndarray, k: int, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Top-k sense indices and probabilities ([N, k]; -1 / 0 padding) of a softmax at `temperature`.

    The softmax runs over all of a token's senses, so the stored k probabilities are
    the teacher's real ones (they sum to less than 1 when k is below the sense count).
    """
    k = min(k, scores.shape[1])
    valid = np.isfinite(scores)
    scaled = np.where(valid, scores / temperature, -np.inf)
    row_max = scaled.max(axis=1, keepdims=True)
    weights = np.where(valid, np.exp(scaled - np.where(np.isfinite(row_max), row_max, 0.0)), 0.0)
    probs = weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-30)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    top_ids = np.where(np.take_along_axis(valid, top, axis=1), top, -1)
    top_probs = np.where(top_ids >= 0, np.take_along_axis(probs, top, axis=1), 0.0)
    return top_ids.astype(np.int16), top_probs.astype(np.float16)


class LabelSink:
    """Writes one labels/ sample per window: ids, hard senses, optional soft targets and states."""

    def __init__(self, dictionary: SenseDictionary, cfg: RunConfig):
        self.dictionary, self.cfg = dictionary, cfg.label

    def write_batch(self, writer, windows: list[corpus.Window], states: np.ndarray, counters: dict[str, Counter]) -> None:
        for window, window_states in zip(windows, states):
            self.write(writer, window, window_states[: len(window.input_ids)], counters)

    def write(self, writer, window: corpus.Window, states: np.ndarray, counters: dict[str, Counter]) -> None:
        ids = np.asarray(window.input_ids, dtype=np.int64)
        scores = self.dictionary.scores(ids, states, self.cfg.similarity)
        has_entry = np.isfinite(scores).any(axis=1) & ~np.asarray(window.special)
        senses = np.where(has_entry, np.argmax(np.where(np.isfinite(scores), scores, -np.inf), axis=1), -1)
        counters.setdefault("totals", Counter())["labelled"] += int(has_entry.sum())
        fields = {"input_ids.npy": npy_bytes(ids.astype(np.int32)), "senses.npy": npy_bytes(senses.astype(np.int16))}
        if self.cfg.soft_topk:
            soft_ids, soft_probs = soft_targets(scores, self.cfg.soft_topk, self.cfg.temperature)
            soft_ids[~has_entry], soft_probs[~has_entry] = -1, 0
            fields.update({"soft_ids.npy": npy_bytes(soft_ids), "soft_probs.npy": npy_bytes(soft_probs)})
        if self.cfg.store_hidden:
            fields["teacher.npy"] = npy_bytes(states.astype(np.float16))
        writer.write(f"{window.doc:010d}_{window.index:05d}", fields)


def label_settings(cfg: RunConfig, teacher: Teacher, corpus_path: str, dictionary_fp: str) -> dict:
    lab, c = cfg.label, cfg.corpus
    return {
        "corpus_fingerprint": corpus_fingerprint(corpus_path),
        "text_field": c.text_field, "max_length": c.max_length,
        "stride": c.stride, "max_documents": c.max_documents, "similarity": lab.similarity, "soft_topk": lab.soft_topk,
        "temperature": lab.temperature, "store_hidden": lab.store_hidden, "dictionary_fingerprint": dictionary_fp,
        "teacher_fingerprint": teacher.fingerprint, "tokenizer_fingerprint": teacher.tokenizer_fingerprint,
        "layer": teacher.layer, "dtype": teacher.dtype, "instruction": teacher.instruction,
        "bidirectional": teacher.bidirectional,
    }


def run(cfg: RunConfig, restart: bool = False) -> Path:
    """Label the distillation corpus into RUN/labels/ and return that directory.

    restart: move a labels/ made from other inputs or settings aside instead of refusing (--restart-stage)."""
    env = comm.init_torch()
    out_dir, dict_dir = cfg.run_path / "labels", cfg.run_path / "dictionary"
    corpus_path = cfg.label.corpus_path or cfg.corpus.path
    dataset = corpus.load_documents(corpus_path, cfg.corpus.text_field, cfg.corpus.max_documents)
    dictionary = SenseDictionary.load(dict_dir)
    dictionary_fp = file_fingerprint([dict_dir / "index.json"])
    teacher = Teacher(cfg.model, cfg.extract.ds_config, cfg.label.batch_size, cfg.extract.offload, cfg.extract.nvme_path,
                      cfg.extract.partition, max_length=cfg.corpus.max_length)
    check_teacher_matches(dictionary, teacher)
    settings = label_settings(cfg, teacher, corpus_path, dictionary_fp)
    with open_stage(cfg, "label", out_dir, settings, restart=restart, rank=env.rank, share=comm.broadcast_object) as stage:
        if finished_and_whole(out_dir, LABELS_FORMAT, LABELS_VERSION, settings, env.rank, comm.broadcast_object):
            log.info("%s is complete for these settings; nothing to do", out_dir)
            return out_dir
        stage.begin()
        run_pass(teacher, dataset, cfg.corpus, out_dir, "labels", settings, LabelSink(dictionary, cfg),
                 cfg.label.batch_size, cfg.label.shard_samples, cfg.run_path / "tb" / "label")
        comm.barrier()
        _write_manifest(cfg, teacher, settings, out_dir)
        comm.barrier()
    return out_dir


def _write_manifest(cfg: RunConfig, teacher: Teacher, settings: dict, out_dir: Path) -> None:
    states = gather_progress(out_dir, settings)
    if not comm.detect().is_main:
        return
    totals = merge_counters(states).get("totals", Counter())
    body = {
        "teacher": str(teacher.path), "teacher_fingerprint": teacher.fingerprint,
        "corpus": str(Path(cfg.label.corpus_path or cfg.corpus.path).resolve()),
        "tokenizer_fingerprint": teacher.tokenizer_fingerprint, "dictionary_fingerprint": settings["dictionary_fingerprint"],
        "layer": teacher.layer, "d": teacher.d, "similarity": cfg.label.similarity, "soft_topk": cfg.label.soft_topk,
        "temperature": cfg.label.temperature, "store_hidden": cfg.label.store_hidden, "settings": settings,
        "shards": sorted((s for st in states for s in st["shards"]), key=lambda s: s["file"]),
        "totals": {"windows": totals["windows"], "tokens": totals["tokens"], "labelled": totals["labelled"]},
        "world_size": comm.detect().world_size,
    }
    write_manifest(out_dir, LABELS_FORMAT, LABELS_VERSION, body)
    log.info("wrote %s: %d of %d tokens labelled", out_dir, totals["labelled"], totals["tokens"])
