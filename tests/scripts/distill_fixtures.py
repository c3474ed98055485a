"""Stand-in inputs for the distillation tests: a dictionary and labels made by a plain HF forward.

Until the label stage (dist_sense/label.py) is exercised end to end, this writes RUN/dictionary
and RUN/labels exactly as the contract says: each token's senses are a few of its own hidden
states (a crude k-means), labels are SenseDictionary.nearest of the teacher's states.
"""
from __future__ import annotations

from pathlib import Path

import helpers as testing
import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from dist_sense.formats import corpus, manifest
from dist_sense.formats.dictionary import SenseDictionary
from dist_sense.formats.labels import LABELS_FORMAT, LABELS_VERSION
from dist_sense.formats.shards import RankShardWriter, npy_bytes
from dist_sense.model.teacher import teacher_fingerprint


def teacher_windows(teacher_dir, n_docs: int, max_length: int, seed: int):
    """(tokenizer, windows, per-window [L, d] last-layer states) of the toy corpus."""
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModel.from_pretrained(teacher_dir).eval()
    docs = testing.toy_sentences(n_docs, seed)
    windows = list(corpus.iter_windows(enumerate(docs), tokenizer, max_length))
    states = []
    for start in range(0, len(windows), 16):
        part = windows[start : start + 16]
        ids, mask = corpus.batch_windows(part, tokenizer.pad_token_id)
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
        states.extend(hidden[i, : len(w.input_ids)] for i, w in enumerate(part))
    return tokenizer, model, windows, states


def write_dictionary(out_dir, tokenizer, model, teacher_dir, windows, states, senses: int, seed: int) -> SenseDictionary:
    by_token: dict[int, list[np.ndarray]] = {}
    for w, h in zip(windows, states):
        for pos, (tok, special) in enumerate(zip(w.input_ids, w.special)):
            if not special:
                by_token.setdefault(tok, []).append(h[pos])
    rng = np.random.default_rng(seed)
    token_ids, offsets, centroids = [], [0], []
    for tok in sorted(by_token):
        vecs = np.stack(by_token[tok])
        pick = rng.choice(len(vecs), size=min(senses, len(vecs)), replace=False)
        token_ids.append(tok)
        centroids.extend(vecs[pick])
        offsets.append(len(centroids))
    meta = {"tokenizer_fingerprint": manifest.tokenizer_fingerprint(tokenizer),
            "teacher_fingerprint": teacher_fingerprint(teacher_dir, teacher_dir),
            "layer": model.config.num_hidden_layers, "vocab_size": len(tokenizer), "teacher": str(teacher_dir)}
    SenseDictionary(token_ids, offsets, np.stack(centroids).astype(np.float32), meta=meta).save(out_dir)
    return SenseDictionary.load(out_dir)


def soft_targets(dictionary: SenseDictionary, ids: np.ndarray, h: np.ndarray, k: int, temperature: float):
    centres, mask, token_to_row = dictionary.padded(np)
    soft_ids = np.full((len(ids), k), -1, np.int16)
    soft_probs = np.zeros((len(ids), k), np.float16)
    for pos, tok in enumerate(ids):
        row = token_to_row[tok] if tok < len(token_to_row) else -1
        if row < 0:
            continue
        logits = np.where(mask[row], centres[row] @ h[pos] / temperature, -np.inf)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        top = np.argsort(-p)[: min(k, int(mask[row].sum()))]
        soft_ids[pos, : len(top)] = top
        soft_probs[pos, : len(top)] = p[top]
    return soft_ids, soft_probs


def make_run(run_dir, teacher_dir, n_docs: int = 48, max_length: int = 16, senses: int = 3, seed: int = 0,
             dictionary_seed: int = 0, shard_samples: int = 8, soft_topk: int = 0, temperature: float = 1.0,
             store_hidden: bool = False) -> Path:
    """Write RUN/dictionary and RUN/labels (two 'ranks' of shards) for `teacher_dir`; returns RUN."""
    run_dir = Path(run_dir)
    tokenizer, model, windows, states = teacher_windows(teacher_dir, n_docs, max_length, seed)
    dictionary = write_dictionary(run_dir / "dictionary", tokenizer, model, teacher_dir, windows, states, senses,
                                  dictionary_seed)
    labels_dir = run_dir / "labels"
    writers = [RankShardWriter(labels_dir, "labels", rank, shard_samples) for rank in (0, 1)]
    totals = {"windows": 0, "tokens": 0, "labelled": 0}
    for i, (w, h) in enumerate(zip(windows, states)):
        ids = np.asarray(w.input_ids, np.int64)
        sense = dictionary.nearest(ids, h).astype(np.int16)
        sense[np.asarray(w.special)] = -1
        fields = {"input_ids.npy": npy_bytes(ids.astype(np.int32)), "senses.npy": npy_bytes(sense)}
        if soft_topk:
            soft_ids, soft_probs = soft_targets(dictionary, ids, h, soft_topk, temperature)
            soft_ids[np.asarray(w.special)] = -1
            fields.update({"soft_ids.npy": npy_bytes(soft_ids), "soft_probs.npy": npy_bytes(soft_probs)})
        if store_hidden:
            fields["teacher.npy"] = npy_bytes(h.astype(np.float16))
        writers[i % 2].write(f"{w.doc:010d}_{w.index:05d}", fields)
        totals["windows"] += 1
        totals["tokens"] += len(ids)
        totals["labelled"] += int((sense >= 0).sum())
    for writer in writers:
        writer.close()
    body = {"teacher": str(teacher_dir), "teacher_fingerprint": teacher_fingerprint(teacher_dir, teacher_dir),
            "tokenizer_fingerprint": manifest.tokenizer_fingerprint(tokenizer),
            "dictionary_fingerprint": manifest.file_fingerprint([run_dir / "dictionary" / "index.json"]),
            "layer": model.config.num_hidden_layers, "d": dictionary.d, "similarity": "dot", "soft_topk": soft_topk,
            "temperature": temperature, "store_hidden": store_hidden,
            "shards": sorted((s for wr in writers for s in wr.written), key=lambda s: s["file"]),
            "totals": totals, "world_size": 2}
    manifest.write_manifest(labels_dir, LABELS_FORMAT, LABELS_VERSION, body)
    return run_dir


def chance_agreement(run_dir) -> float:
    """Mean 1/k over labelled tokens: the top-1 agreement of a student that guesses."""
    dictionary = SenseDictionary.load(Path(run_dir) / "dictionary")
    from dist_sense.formats.labels import read_labels_manifest, read_samples, shard_keys

    labels = Path(run_dir) / "labels"
    inverse = []
    for entry in read_labels_manifest(labels)["shards"]:
        path = labels / entry["file"]
        for sample in read_samples(path, set(shard_keys(path))).values():
            ids = sample["input_ids"][sample["senses"] >= 0]
            inverse.extend(1.0 / dictionary.num_senses[dictionary.token_to_row[ids]])
    return float(np.mean(inverse))
