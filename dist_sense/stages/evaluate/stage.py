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

import numpy as np
import torch

from dist_sense import comm
from dist_sense.config import RunConfig
from dist_sense.formats.corpus import iter_windows, load_documents
from dist_sense.formats.dictionary import SenseDictionary
from dist_sense.formats.manifest import atomic_write_json
from dist_sense.model.encoder import EncodedText, SenseEncoder
from dist_sense.runtime.metrics import summary_writer
from dist_sense.stages.evaluate.probes import EvalError, content_mask, row_cosine, sentence_probes, wic_probe

log = comm.get_logger("dist_sense.evaluate")

TOP_K = 5
REPORT_WORDS = 8
"""Ambiguous words whose senses the report lists."""
EXAMPLES_PER_SENSE = 2
PLOT_WORDS, PLOT_CANDIDATES = 4, 16
"""Words drawn in senses.png, chosen among this many ambiguous words."""
PLOT_DOCUMENTS, PLOT_OCCURRENCES = 1000, 150
"""Training documents searched for the plotted words; occurrences drawn per word."""


# ----------------------------------------------------------------------------- systems


def teacher_net(cfg: RunConfig, device):
    """(the teacher in model.dtype, its forward reading cfg.model.layer), as SenseEncoder.load(model="teacher") has it."""
    from dist_sense.model.loading import frozen_teacher
    from dist_sense.model.teacher import layer_states, normalise_layer

    net = frozen_teacher(cfg.model, device)
    n_layers = int(net.config.num_hidden_layers)
    layer = normalise_layer(cfg.model.layer, n_layers)
    return net, lambda ids, mask: layer_states(net, ids, mask, layer, n_layers)


def saved_student(path: Path, what: str, device, dictionary_dir: Path):
    from dist_sense.model.student import INFO_NAME, check_dictionary, load_student

    if not (path / INFO_NAME).is_file():
        raise EvalError(f"{path}: no {what} here (no {INFO_NAME}); run launcher/distill.py first "
                        f"or point the config at a saved student")
    student = load_student(path, device)
    check_dictionary(student, path, dictionary_dir)
    return student


def untrained_student(cfg: RunConfig, trained, d: int, device):
    """The distilled student's architecture before any training: for init=truncate, the teacher's first layers."""
    from dist_sense.model.student import build_student

    distill = cfg.distill
    if trained.info.get("init") == "truncate":  # the depth of the student we compare with, whatever the config says
        distill = dataclasses.replace(distill, init="truncate", layers=int(trained.info.get("layers") or distill.layers))
    torch.manual_seed(distill.seed)  # init=model: the same random head every time
    return build_student(dataclasses.replace(cfg, distill=distill), d).to(device).eval()


def open_encoders(cfg: RunConfig, tokenizer, dictionary: SenseDictionary, device, notes: dict) -> dict:
    """name -> SenseEncoder (None for a missing optional MSE student, with the reason in notes)."""
    net, forward = teacher_net(cfg, device)
    teacher = SenseEncoder(net, tokenizer, dictionary, forward, cfg.eval.similarity, device,
                           max_length=min(int(tokenizer.model_max_length or 512), 512),
                           instruction=cfg.model.instruction)
    wrap = teacher.with_model  # one snapping table for every system

    student_dir = cfg.run_path / "student" / "final"
    student = saved_student(student_dir, "distilled student", device, cfg.run_path / "dictionary")
    encoders = {"student": wrap(student), "teacher": teacher,
                "student_no_kd": wrap(untrained_student(cfg, student, dictionary.d, device)), "student_mse": None}
    # The MSE baseline is optional unless the config names it.
    mse_dir = Path(cfg.eval.mse_student) if cfg.eval.mse_student else cfg.run_path / "student_mse" / "final"
    if cfg.eval.mse_student or (mse_dir / "student.json").is_file():
        encoders["student_mse"] = wrap(saved_student(mse_dir, "MSE baseline student (eval.mse_student)", device,
                                                         cfg.run_path / "dictionary"))
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
    windows = iter_windows(enumerate(documents["text"]), tokenizer, cfg.corpus.max_length, 0, cfg.model.instruction)
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


def sense_pictures(cfg: RunConfig, encoder: SenseEncoder, notes: dict, held_out: list[str]) -> dict:
    """RUN/eval/senses.png (a few ambiguous words' occurrences, coloured by sense) and the sense
    centres for TensorBoard's projector under RUN/tb/senses; returns what the report shows."""
    from dist_sense.stages.evaluate.figures import export_projector, plot_senses, word_occurrences

    candidates = [e["word"] for e in notes.get("words", [])] + list(notes.get("wic", {}).get("words", []))
    candidates = list(dict.fromkeys(candidates))[:PLOT_CANDIDATES]
    # The dictionary's own corpus has the most occurrences of each word; held-out text adds unseen ones.
    documents = load_documents(cfg.corpus.path, cfg.corpus.text_field, PLOT_DOCUMENTS)["text"]
    found = word_occurrences(encoder, list(documents) + list(held_out), candidates,
                             max_per_word=PLOT_OCCURRENCES, batch_size=cfg.eval.batch_size)
    # Words whose occurrences spread over the most senses show the split best.
    ordered = sorted(found.values(), key=lambda o: -len(np.unique(o["sense_ids"])))
    png = plot_senses({o["word"]: o for o in ordered}, cfg.run_path / "eval" / "senses.png", max_words=PLOT_WORDS)
    projector = export_projector(encoder.dictionary, encoder.tokenizer, cfg.run_path / "tb" / "senses")
    log.info("sense pictures: %s (%s); projector export in %s", png, ", ".join(o["word"] for o in ordered[:PLOT_WORDS]),
             projector)
    return {"senses_png": png.name if png else None, "plotted_words": [o["word"] for o in ordered[:PLOT_WORDS]],
            "projector": str(projector)}


def run(cfg: RunConfig, restart: bool = False) -> Path:
    """Evaluate RUN's dictionary and students into RUN/eval/ (metrics.json, details.json, report.md).

    Every run evaluates anew and replaces eval/ (restart changes nothing here); one at a time
    per run directory (RUN/.lock-eval)."""
    from dist_sense.runtime.rundir import RunLock, check_writable

    out_dir = cfg.run_path / "eval"
    if not comm.detect().is_main:  # one process does all of it; other ranks have nothing to add
        return out_dir
    check_writable(cfg.run_path, "run_dir of evaluate")
    with RunLock(cfg.run_path, "eval", "evaluate"):
        return _evaluate(cfg, out_dir)


def _evaluate(cfg: RunConfig, out_dir: Path) -> Path:
    from dist_sense.model.teacher import load_tokenizer
    from dist_sense.stages.evaluate.mteb_tasks import mteb_metrics
    from dist_sense.stages.evaluate.report import write_report
    from dist_sense.stages.evaluate.task_head import task_head_metrics

    dictionary = SenseDictionary.load(cfg.run_path / "dictionary")
    tokenizer = load_tokenizer(cfg.model)
    dictionary.check_tokenizer(tokenizer)
    # SenseEncoder takes each text's tokens from the front of its padded row: left padding would break it.
    tokenizer.padding_side = "right"
    device = comm.device()
    notes = {"skipped": {}, "probes": {}}
    labels_manifest = cfg.run_path / "labels" / "manifest.json"
    trained_for = json.loads(labels_manifest.read_text()).get("similarity") if labels_manifest.is_file() else None
    if trained_for and trained_for != cfg.eval.similarity:
        log.warning("eval.similarity=%s but the student was trained on %s labels (%s): agreement and "
                    "student_senses measure a rule it was not trained for", cfg.eval.similarity, trained_for,
                    labels_manifest)
    texts, source, is_training = held_out_texts(cfg, tokenizer)  # before the models: a bad corpus fails at once
    encoders = open_encoders(cfg, tokenizer, dictionary, device, notes)
    if is_training:
        log.warning("held-out text %s is a training corpus (set eval.corpus_path to unseen text)", source)
    metrics, notes["held_out"] = held_out_metrics(texts, encoders, dictionary, cfg)
    metrics.update({"eval.held_out_source": str(source), "eval.held_out_is_training_corpus": bool(is_training),
                    "eval.similarity": cfg.eval.similarity})
    metrics.update(task_head_metrics(cfg, encoders, notes))  # the GLUE setting's judge, when a task is set
    metrics.update(sentence_probes(cfg, encoders, notes))
    metrics.update(mteb_metrics(cfg, encoders, notes, out_dir))  # the LLM setting's judge, when tasks are set
    if cfg.eval.wic_path:
        metrics.update(wic_probe(cfg, encoders, notes))
    else:
        log.info("no eval.wic_path: the word-in-context probe is skipped")
    metrics.update({"size.teacher_params": parameter_count(encoders["teacher"].model),
                    "size.student_params": parameter_count(encoders["student"].model),
                    "size.dictionary_bytes": directory_bytes(cfg.run_path / "dictionary")})
    notes["words"] = ambiguous_words(encoders["teacher"], notes, texts)
    notes["figures"] = sense_pictures(cfg, encoders["teacher"], notes, texts)
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
