"""Stage 4: how faithful are the senses, how well does the student match, what do they buy? -> RUN/eval/.

    python launcher/evaluate.py run_dir=RUN [key=value ...]

RUN/eval/metrics.json holds flat dotted keys: fidelity.* (the teacher's states against their
snapped senses), agreement.* (the student's sense against the teacher's), downstream.<task>.<system>
(probe accuracy on sentence embeddings; wic: ROC AUC of word cosines), size.*, speed.* and
eval.held_out_source / eval.held_out_is_training_corpus. RUN/eval/details.json keeps what the
report needs besides the numbers (counts, skip reasons, the senses of a few ambiguous words);
RUN/eval/report.md is rendered from both files.
Every model is run through SenseEncoder.encode, batch by batch, the same way for every system.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import dist
from .config import RunConfig
from .corpus import iter_windows, load_documents
from .dictionary import SenseDictionary
from .encoder import EncodedText, SenseEncoder
from .manifest import ManifestError, atomic_write_json
from .metrics import summary_writer

log = dist.get_logger("dist_sense.evaluate")

SYSTEMS = {  # system -> (the encoder that runs it, the embeddings it is judged on)
    "teacher": ("teacher", "continuous"),
    "teacher_senses": ("teacher", "senses"),
    "student_senses": ("student", "senses"),
    "student_no_kd": ("student_no_kd", "continuous"),
    "student_mse": ("student_mse", "continuous"),
}
PROBE_SEED = 0
"""Seed of the shuffle that splits probe examples into train and test."""
PROBE_TEST_FRACTION = 0.2
PROBE_MAX_ITER = 1000
TOP_K = 5
REPORT_WORDS = 8
"""Ambiguous words whose senses the report lists."""
EXAMPLES_PER_SENSE = 2


class EvalError(ManifestError):
    """A model, probe file or held-out text that evaluation cannot use; the message names it."""


# ----------------------------------------------------------------------------- systems


def teacher_net(cfg: RunConfig, device):
    """(the teacher in fp32, its forward reading cfg.model.layer), as SenseEncoder.load(model="teacher") has it."""
    from transformers import AutoModel

    from .teacher import layer_states, normalise_layer, resolve_model_path

    net = AutoModel.from_pretrained(resolve_model_path(cfg.model.teacher), dtype=torch.float32).to(device).eval()
    n_layers = int(net.config.num_hidden_layers)
    layer = normalise_layer(cfg.model.layer, n_layers)
    return net, lambda ids, mask: layer_states(net, ids, mask, layer, n_layers)


def saved_student(path: Path, what: str, device):
    from .student import INFO_NAME, load_student

    if not (path / INFO_NAME).is_file():
        raise EvalError(f"{path}: no {what} here (no {INFO_NAME}); run launcher/distill.py first "
                        f"or point the config at a saved student")
    return load_student(path, device)


def untrained_student(cfg: RunConfig, trained, d: int, device):
    """The distilled student's architecture before any training: for init=truncate, the teacher's first layers."""
    from .student import build_student

    distill = cfg.distill
    if trained.info.get("init") == "truncate":  # the depth of the student we compare with, whatever the config says
        distill = dataclasses.replace(distill, init="truncate", layers=int(trained.info.get("layers") or distill.layers))
    torch.manual_seed(distill.seed)  # init=model: the same random head every time
    return build_student(dataclasses.replace(cfg, distill=distill), d).to(device).eval()


def open_encoders(cfg: RunConfig, tokenizer, dictionary: SenseDictionary, device, notes: dict) -> dict:
    """name -> SenseEncoder (None for a missing optional MSE student, with the reason in notes)."""
    def wrap(net, forward=None):
        return SenseEncoder(net, tokenizer, dictionary, forward or net, cfg.eval.similarity, device,
                            max_length=min(int(tokenizer.model_max_length or 512), 512))

    student_dir = cfg.run_path / "student" / "final"
    student = saved_student(student_dir, "distilled student", device)
    encoders = {"student": wrap(student), "teacher": wrap(*teacher_net(cfg, device)),
                "student_no_kd": wrap(untrained_student(cfg, student, dictionary.d, device)), "student_mse": None}
    # The MSE baseline is optional unless the config names it.
    mse_dir = Path(cfg.eval.mse_student) if cfg.eval.mse_student else cfg.run_path / "student_mse" / "final"
    if cfg.eval.mse_student or (mse_dir / "student.json").is_file():
        encoders["student_mse"] = wrap(saved_student(mse_dir, "MSE baseline student (eval.mse_student)", device))
    else:
        notes["skipped"]["student_mse"] = (f"{mse_dir} does not exist: distill with distill.loss=mse "
                                           f"(or set eval.mse_student) to evaluate the MSE baseline")
        log.info("student_mse skipped: %s", notes["skipped"]["student_mse"])
    notes["students"] = {"student": str(student_dir), "student_mse": str(mse_dir)}
    return encoders


def parameter_count(module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def directory_bytes(path: Path) -> int:
    return int(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()))


# ----------------------------------------------------------------------------- encoding


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def content_mask(encoded: EncodedText) -> np.ndarray:
    """True for tokens that cover text; the encoder gives special tokens the empty span (0, 0)."""
    spans = np.asarray(encoded.offsets, dtype=np.int64).reshape(-1, 2)
    return spans[:, 1] > spans[:, 0]


def encode_each(encoder: SenseEncoder, texts: list[str], batch_size: int, pick: Callable[[EncodedText, int], object]):
    """pick(encoded, index) for every text, encoding batch by batch so only the picked parts are kept."""
    kept = []
    for start in range(0, len(texts), batch_size):
        batch = encoder.encode(texts[start : start + batch_size], batch_size=batch_size)
        kept.extend(pick(encoded, start + i) for i, encoded in enumerate(batch))
    return kept


class Clock:
    """Tokens and seconds of the encode calls that are timed."""

    def __init__(self):
        self.tokens, self.seconds = 0, 0.0

    def encode(self, encoder: SenseEncoder, texts: list[str], timed: bool) -> list[EncodedText]:
        started = time.perf_counter()
        out = encoder.encode(texts, batch_size=len(texts))  # numpy results: the device has finished
        if timed:
            self.seconds += time.perf_counter() - started
            self.tokens += sum(len(e.token_ids) for e in out)
        return out

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def held_out_texts(cfg: RunConfig, tokenizer) -> tuple[list[str], str, bool]:
    """(window texts of the held-out documents, their source, whether it is a training corpus)."""
    source = cfg.eval.corpus_path or cfg.corpus.path
    trained_on = {cfg.corpus.path, cfg.label.corpus_path or cfg.corpus.path}
    is_training = not cfg.eval.corpus_path or any(
        p and Path(p).resolve() == Path(source).resolve() for p in trained_on)
    documents = load_documents(source, cfg.corpus.text_field, cfg.eval.max_documents)
    # The training windows (no overlap, so no token counts twice), each well inside the encoder's max_length.
    windows = iter_windows(enumerate(documents["text"]), tokenizer, cfg.corpus.max_length, stride=0)
    return [w.text for w in windows], source, is_training


def batch_stats(taught: list[EncodedText], student: list[EncodedText], dictionary: SenseDictionary,
                similarity: str) -> np.ndarray:
    """[cos sum, tokens with an entry, content tokens, top-1 hits, top-5 hits] of one batch, vectorised."""
    def flat(field, outs):
        return np.concatenate([np.asarray(getattr(e, field)) for e in outs])

    content = np.concatenate([content_mask(e) for e in taught])
    ids, t_sense, s_sense = flat("token_ids", taught), flat("sense_ids", taught), flat("sense_ids", student)
    has = content & (t_sense >= 0)  # one tokenizer for both models, so positions line up
    cos = row_cosine(flat("hidden", taught)[has], flat("sense_embeddings", taught)[has])
    target = t_sense[has]
    scores = dictionary.scores(ids[has], flat("hidden", student)[has], similarity)
    k = min(TOP_K, scores.shape[1])
    best = np.argpartition(-scores, k - 1, axis=1)[:, :k] if len(target) else np.zeros((0, k), np.int64)
    # Padding senses score -inf and have indices no real target takes, so they never count as a hit.
    top5 = (best == target[:, None]).any(axis=1)
    return np.array([cos.sum(), has.sum(), content.sum(), (s_sense[has] == target).sum(), top5.sum()], dtype=np.float64)


def held_out_metrics(texts: list[str], encoders: dict, dictionary: SenseDictionary, cfg: RunConfig):
    """(fidelity, agreement and speed metrics, token counts) over the held-out windows, batch by batch."""
    size = cfg.eval.batch_size
    batches = [texts[i : i + size] for i in range(0, len(texts), size)]
    if not batches:
        raise EvalError(f"{cfg.eval.corpus_path or cfg.corpus.path}: the held-out text has no tokens")
    clocks = {"teacher": Clock(), "student": Clock()}
    sums = np.zeros(5)
    for number, batch in enumerate(batches):
        # The first batch warms both models up (allocations, kernel choice) and is not timed.
        taught = clocks["teacher"].encode(encoders["teacher"], batch, timed=number > 0)
        student = clocks["student"].encode(encoders["student"], batch, timed=number > 0)
        sums += batch_stats(taught, student, dictionary, cfg.eval.similarity)
    if len(batches) == 1:  # nothing was timed: time the (now warm) batch again
        for name, clock in clocks.items():
            clock.encode(encoders[name], batches[0], timed=True)
    cos_sum, labelled, content, top1, top5 = sums.tolist()
    return {
        "fidelity.mean_cos": cos_sum / max(labelled, 1), "fidelity.coverage": labelled / max(content, 1),
        "agreement.top1": top1 / max(labelled, 1), "agreement.top5": top5 / max(labelled, 1),
        "speed.teacher_tokens_per_s": clocks["teacher"].tokens_per_s,
        "speed.student_tokens_per_s": clocks["student"].tokens_per_s,
    }, {"windows": len(texts), "content_tokens": int(content), "tokens_with_senses": int(labelled)}


# ----------------------------------------------------------------------------- downstream probes


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


def probe_accuracy(features: np.ndarray, labels: list, source: str) -> float:
    """Test accuracy of a logistic regression on a fixed, seeded 80/20 split by index."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray([str(label) for label in labels])
    order = np.random.default_rng(PROBE_SEED).permutation(len(labels))
    n_test = max(1, int(round(PROBE_TEST_FRACTION * len(labels))))
    test, train = order[:n_test], order[n_test:]
    if len(np.unique(labels[train])) < 2:
        raise EvalError(f"{source}: the probe's training split has fewer than two labels; give it more examples")
    # Scaling first: raw hidden states of LMs have a few huge dimensions that stall the solver.
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=PROBE_MAX_ITER))
    probe.fit(features[train], labels[train])
    return float((probe.predict(features[test]) == labels[test]).mean())


def sentence_probes(cfg: RunConfig, encoders: dict, notes: dict) -> dict:
    """downstream.<task>.<system> for every task of eval.probe_tasks."""
    metrics = {}
    for task in cfg.eval.probe_tasks:
        name, path = str(task).split("=", 1)
        if name == "wic" or f"downstream.{name}.teacher" in metrics:  # its keys would overwrite others
            raise EvalError(f"eval.probe_tasks: task name {name!r} is taken; give each task its own, not 'wic'")
        records = read_jsonl(path, ("text", "label"), cfg.eval.max_probe_examples, f"probe task {name!r}")
        texts, labels = [str(r["text"]) for r in records], [r["label"] for r in records]
        pooled = {}
        for encoder_name in dict.fromkeys(enc for enc, _ in SYSTEMS.values()):
            if encoders.get(encoder_name) is not None:
                pairs = encode_each(encoders[encoder_name], texts, cfg.eval.batch_size,
                                    lambda e, _: (np.array(e.sentence_embedding), np.array(e.sentence_sense_embedding)))
                pooled[encoder_name] = {"continuous": np.stack([p[0] for p in pairs]),
                                        "senses": np.stack([p[1] for p in pairs])}
        for system, (encoder_name, kind) in SYSTEMS.items():
            value = probe_accuracy(pooled[encoder_name][kind], labels, path) if encoder_name in pooled else None
            metrics[f"downstream.{name}.{system}"] = value
        notes["probes"][name] = {"path": path, "examples": len(records), "labels": len(set(map(str, labels)))}
        log.info("probe %s (%d examples): %s", name, len(records),
                 ", ".join(f"{s} {metrics[f'downstream.{name}.{s}']}" for s in SYSTEMS))
    return metrics


def token_at(encoded: EncodedText, start: int, end: int) -> int:
    """Index of the first token overlapping the character span [start, end); -1 if none does."""
    for i, (a, b) in enumerate(encoded.offsets):
        if b > a and a < end and b > start:
            return i
    return -1


def wic_vectors(encoder: SenseEncoder, texts: list[str], spans: list[tuple[int, int]], batch_size: int, source: str):
    """(continuous, sense) [n, d] embeddings of each text's marked word."""
    def pick(encoded: EncodedText, index: int):
        at = token_at(encoded, *spans[index])
        if at < 0:
            raise EvalError(f"{source}: pair {index // 2 + 1}: no token covers characters {spans[index]} of "
                            f"{texts[index][:60]!r} (wrong span, or cut at max_length)")
        # Copies: a view would keep the whole batch's arrays alive until the end.
        return np.array(encoded.hidden[at]), np.array(encoded.sense_embeddings[at])

    picked = encode_each(encoder, texts, batch_size, pick)
    return {"continuous": np.stack([p[0] for p in picked]), "senses": np.stack([p[1] for p in picked])}


def wic_probe(cfg: RunConfig, encoders: dict, notes: dict) -> dict:
    """downstream.wic.<system>: ROC AUC of the cosine between the word's embeddings in the two texts."""
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
    vectors = {name: wic_vectors(enc, texts, spans, cfg.eval.batch_size, path)
               for name, enc in encoders.items() if enc is not None}
    metrics = {}
    for system, (encoder_name, kind) in SYSTEMS.items():
        if encoder_name not in vectors:
            metrics[f"downstream.wic.{system}"] = None
            continue
        cos = row_cosine(vectors[encoder_name][kind][0::2], vectors[encoder_name][kind][1::2])
        metrics[f"downstream.wic.{system}"] = float(roc_auc_score(same, cos))
    words = [str(p["text1"])[int(p["start1"]) : int(p["end1"])].lower() for p in pairs]
    notes["wic"] = {"path": path, "pairs": len(pairs), "same": int(same.sum()),
                    "words": sorted(set(words), key=lambda w: (-words.count(w), w))}
    log.info("wic (%d pairs): %s", len(pairs), ", ".join(f"{s} {metrics[f'downstream.wic.{s}']}" for s in SYSTEMS))
    return metrics


# ----------------------------------------------------------------------------- the stage


def ambiguous_words(encoder: SenseEncoder, notes: dict, held_out: list[str]) -> list[dict]:
    """Senses (counts, examples) of the WiC words, else of the most frequent held-out tokens with >= 2 senses."""
    words = list(notes.get("wic", {}).get("words", []))[:REPORT_WORDS]
    if not words:
        encoded = encoder.tokenizer(held_out, add_special_tokens=False)["input_ids"] if held_out else []
        ids = np.fromiter((t for row in encoded for t in row), dtype=np.int64)
        counts = np.bincount(ids, minlength=encoder.dictionary.vocab_size)[: encoder.dictionary.vocab_size]
        ambiguous = np.where(counts > 0)[0]
        ambiguous = ambiguous[encoder.dictionary.token_to_row[ambiguous] >= 0]
        ambiguous = ambiguous[encoder.dictionary.num_senses[encoder.dictionary.token_to_row[ambiguous]] >= 2]
        top = ambiguous[np.argsort(-counts[ambiguous], kind="stable")][:REPORT_WORDS]
        words = [w for w in (encoder.tokenizer.decode([int(t)]).strip() for t in top) if w]
    listing = []
    for word in words:
        for entry in encoder.senses(word):
            for sense in entry["senses"]:
                sense["examples"] = [str(x)[:160] for x in sense["examples"][:EXAMPLES_PER_SENSE]]
            listing.append({"word": word, **entry})
    return listing


def run(cfg: RunConfig) -> Path:
    """Evaluate RUN's dictionary and students into RUN/eval/ (metrics.json, details.json, report.md)."""
    from .report import write_report
    from .teacher import load_tokenizer

    out_dir = cfg.run_path / "eval"
    if not dist.detect().is_main:  # one process does all of it; other ranks have nothing to add
        return out_dir
    dictionary = SenseDictionary.load(cfg.run_path / "dictionary")
    tokenizer = load_tokenizer(cfg.model)
    dictionary.check_tokenizer(tokenizer)
    # SenseEncoder takes each text's tokens from the front of its padded row: left padding would break it.
    tokenizer.padding_side = "right"
    device = dist.device()
    notes = {"skipped": {}, "probes": {}}
    encoders = open_encoders(cfg, tokenizer, dictionary, device, notes)
    texts, source, is_training = held_out_texts(cfg, tokenizer)
    if is_training:
        log.warning("held-out text %s is a training corpus (set eval.corpus_path to unseen text)", source)
    metrics, notes["held_out"] = held_out_metrics(texts, encoders, dictionary, cfg)
    metrics.update({"eval.held_out_source": str(source), "eval.held_out_is_training_corpus": bool(is_training)})
    metrics.update(sentence_probes(cfg, encoders, notes))
    if cfg.eval.wic_path:
        metrics.update(wic_probe(cfg, encoders, notes))
    else:
        log.info("no eval.wic_path: the word-in-context probe is skipped")
    metrics.update({"size.teacher_params": parameter_count(encoders["teacher"].model),
                    "size.student_params": parameter_count(encoders["student"].model),
                    "size.dictionary_bytes": directory_bytes(cfg.run_path / "dictionary")})
    notes["words"] = ambiguous_words(encoders["teacher"], notes, texts)
    notes.update(similarity=cfg.eval.similarity, device=str(device), run_dir=str(cfg.run_path))
    atomic_write_json(out_dir / "details.json", notes)
    atomic_write_json(out_dir / "metrics.json", metrics)
    write_scalars(cfg.run_path, metrics)
    report = write_report(cfg.run_path)
    log.info("wrote %s and %s", out_dir / "metrics.json", report)
    return out_dir


def write_scalars(run_dir: Path, metrics: dict) -> None:
    """Each numeric metric as a TensorBoard scalar under RUN/tb/eval (tag: dots become slashes)."""
    writer = summary_writer(run_dir, "eval")
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(key.replace(".", "/"), float(value), 0)
    writer.close()
