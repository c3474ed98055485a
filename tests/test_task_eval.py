"""The GLUE setting's judge: every system's states through the tuned teacher's frozen head."""
import json
import math
from types import SimpleNamespace

import helpers as testing
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_finetune import TOPIC_NAMES, hand_made_head, topic_examples, write_jsonl

from dist_sense.config import RunConfig
from dist_sense.formats.dictionary import SenseDictionary
from dist_sense.formats.tasks import collate, encode_split, load_task
from dist_sense.model import classifier
from dist_sense.model.encoder import SenseEncoder
from dist_sense.stages.evaluate.probes import SYSTEMS, EvalError
from dist_sense.stages.evaluate.stage import teacher_net
from dist_sense.stages.evaluate.task_head import (
    METRICS,
    TASK_SYSTEMS,
    head_predictions,
    macro_f1,
    pooled_features,
    task_head_metrics,
)

TRAIN = [{"text": "bank loan", "label": "no"}, {"text": "bat ball", "label": "yes"}]
# Truth no, yes, yes, yes, no; the teacher says what the first word says: no, yes, no, yes, no.
TEST = [{"text": "bank loan", "label": "no"}, {"text": "bat ball game", "label": "yes"},
        {"text": "bank river", "label": "yes"}, {"text": "bat", "label": "yes"},
        {"text": "bank cash money account", "label": "no"}]


def config(tmp_path, teacher, test=True, **extra) -> RunConfig:
    files = {split: write_jsonl(tmp_path / f"{split}.jsonl", rows)
             for split, rows in (("train", TRAIN), ("validation", TRAIN), ("test", TEST))}
    values = {"run_dir": tmp_path / "run", "model.teacher": teacher, "task.name": "toy", "task.train": files["train"],
              "task.validation": files["validation"], "task.test": files["test"] if test else "",
              "finetune.max_length": 16, **extra}
    return RunConfig.load(None, [f"{k}={v}" for k, v in values.items()])


def save_head_only(head, out_dir):
    """A teacher folder holding only the head's files (what the judge reads of it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, out_dir / classifier.HEAD_WEIGHTS)
    (out_dir / classifier.HEAD_INFO).write_text(json.dumps(classifier.head_description(head, {"task": "toy"})))
    return out_dir


class RecordingTable:
    """A snap table that maps every state to `sense` (or keeps it) and records the ids it was asked to snap."""

    def __init__(self, sense=None):
        self.sense, self.asked = sense, []

    def snap(self, token_ids, states):
        self.asked.extend(token_ids.tolist())
        out = states.clone() if self.sense is None else torch.tensor(self.sense).expand_as(states).clone()
        return torch.zeros_like(token_ids), out


def hand_made_encoder(tokenizer, states_of, table):
    """An object with what the judge uses of a SenseEncoder: its forward, tokenizer, snap table and device."""
    return SimpleNamespace(_forward=lambda ids, mask: states_of(ids), tokenizer=tokenizer, table=table,
                           device=torch.device("cpu"))


def test_each_system_is_scored_through_the_frozen_head(tmp_path):
    tokenizer = testing.build_tokenizer("bert")
    vocab = tokenizer.get_vocab()
    lookup = torch.full((len(tokenizer), 2), 50.0)  # specials and other words: huge, never pooled
    lookup[vocab["bank"]] = torch.tensor([3.0, -3.0])  # through the head: class 0 ("no")
    lookup[vocab["bat"]] = torch.tensor([-3.0, 3.0])  # class 1 ("yes")
    teacher_table, student_table = RecordingTable(), RecordingTable(sense=[-3.0, 3.0])
    encoders = {"teacher": hand_made_encoder(tokenizer, lambda ids: lookup[ids], teacher_table),
                "student": hand_made_encoder(tokenizer, lambda ids: lookup[ids] * 0 + 9.0, student_table),
                "student_no_kd": hand_made_encoder(tokenizer, lambda ids: torch.zeros(*ids.shape, 2), None),
                "student_mse": None}
    teacher = save_head_only(hand_made_head("first_token"), tmp_path / "tuned")
    notes = {"skipped": {}}
    metrics = task_head_metrics(config(tmp_path, teacher, **{"eval.batch_size": 2}), encoders, notes)
    assert len(metrics) == len(METRICS) * len(TASK_SYSTEMS) and set(TASK_SYSTEMS) == {*SYSTEMS, "student_tuned"}
    expected = {"teacher": (0.8, 0.8), "teacher_senses": (0.8, 0.8),
                "student_senses": (0.6, (0 + 6 / 8) / 2),  # snapped to "yes" everywhere
                "student_no_kd": (0.6, 0.375)}  # zeros: logits (0, 1), "yes" everywhere
    for system, (accuracy, f1) in expected.items():
        assert metrics[f"task.toy.{system}.accuracy"] == pytest.approx(accuracy)
        assert metrics[f"task.toy.{system}.macro_f1"] == pytest.approx(f1)
        assert metrics[f"task.toy.{system}.stderr"] == pytest.approx(math.sqrt(accuracy * (1 - accuracy) / 5))
        assert metrics[f"task.toy.{system}.ratio_to_teacher"] == pytest.approx(accuracy / 0.8)
    assert all(metrics[f"task.toy.{s}.{m}"] is None for s in ("student_mse", "student_tuned") for m in METRICS)
    # Own heads: fitted on the two training rows, whose first words tell the classes apart as on the test rows.
    assert metrics["task.toy.teacher.own_head_accuracy"] == pytest.approx(0.8)
    assert metrics["task.toy.teacher_senses.own_head_accuracy"] == pytest.approx(0.8)
    assert notes["task_head"]["own_head_examples"] == 2
    # Only content tokens are snapped: every word of the judged and own-head splits once, never [CLS],
    # [SEP] or padding.
    words = sorted(vocab[w] for row in TEST + TRAIN for w in row["text"].split())
    assert sorted(teacher_table.asked) == words and sorted(student_table.asked) == words
    assert notes["task_head"]["split"] == "test" and notes["task_head"]["pooling"] == "first_token"
    assert notes["task_head"]["examples"] == 5 and set(notes["skipped"]) == {"student_tuned"}


def test_macro_f1_is_sklearns():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    truth, predicted = rng.integers(0, 4, 50), rng.integers(0, 3, 50)
    assert macro_f1(truth, predicted) == pytest.approx(f1_score(truth, predicted, average="macro"))


def test_the_teacher_through_its_own_head_gives_the_tuned_models_predictions(tiny_bert, tmp_path):
    tokenizer = testing.build_tokenizer("bert")
    torch.manual_seed(0)
    model = classifier.build_task_model(str(tiny_bert), sorted(TOPIC_NAMES), "mean", info={"task": "topics"})
    with torch.no_grad():  # a random head with weights large enough that its predictions differ between examples
        model.head.dense.weight.normal_(0, 1)
        model.head.classifier.weight.normal_(0, 3)
    tuned = classifier.save_task_model(model, tmp_path / "tuned", tokenizer)
    files = {split: write_jsonl(tmp_path / f"{split}.jsonl", topic_examples(n, seed))
             for split, n, seed in (("train", 40, 1), ("validation", 24, 2))}
    cfg = RunConfig.load(None, [f"{k}={v}" for k, v in {
        "run_dir": tmp_path / "run", "model.teacher": tuned, "task.name": "topics", "task.train": files["train"],
        "task.validation": files["validation"], "task.text_field": "sentence", "finetune.max_length": 8,
        "eval.batch_size": 5}.items()])
    d = 32
    ids = np.array(sorted(tokenizer.get_vocab()[w] for w in ("bank", "bat", "spring")))
    dictionary = SenseDictionary(ids, np.arange(len(ids) + 1) * 2, np.random.default_rng(0).normal(size=(6, d)),
                                 meta={"vocab_size": len(tokenizer), "teacher": str(tuned), "layer": -1})
    net, forward = teacher_net(cfg, "cpu")
    encoders = {"teacher": SenseEncoder(net, tokenizer, dictionary, forward, "dot", "cpu")}
    notes = {}
    metrics = task_head_metrics(cfg, encoders, notes)
    split = load_task(cfg.task).splits["validation"]
    encoded = encode_split(split, tokenizer, 8)
    whole = classifier.load_task_model(tuned)
    with torch.no_grad():  # each example alone, unpadded, through the tuned model as fine-tuning scores it
        expected = np.array([int(whole(**{k: v for k, v in collate(encoded, [r], 0).items() if k != "labels"})
                                 .argmax()) for r in range(len(encoded))])
    head = classifier.load_task_head(tuned)
    pooled = pooled_features(encoders, TASK_SYSTEMS, encoded, 5, tokenizer.pad_token_id, head.pooling, "test")
    got = {system: head_predictions(head, features, system) for system, features in pooled.items()}
    assert np.array_equal(got["teacher"], expected) and len(set(expected.tolist())) > 1
    assert set(got) == {"teacher", "teacher_senses"}
    assert metrics["task.topics.teacher.accuracy"] == pytest.approx(float((expected == split.label_ids).mean()))
    assert metrics["task.topics.teacher.ratio_to_teacher"] == pytest.approx(1.0)
    assert notes["task_head"]["split"] == "validation" and notes["task_head"]["pooling"] == "mean"


def test_without_a_task_or_a_tuned_head_nothing_is_judged(tiny_bert, tmp_path):
    notes = {"skipped": {}}
    bare = RunConfig.load(None, [f"run_dir={tmp_path / 'run'}", f"model.teacher={tiny_bert}"])
    assert task_head_metrics(bare, {}, notes) == {} and "no labelled task" in notes["skipped"]["task_head"]
    notes = {}
    assert task_head_metrics(config(tmp_path, tiny_bert), {}, notes) == {}
    assert "task_head.json" in notes["skipped"]["task_head"] and "task_head" not in notes


def test_a_student_of_another_width_or_a_head_of_another_task_is_refused(tmp_path):
    tokenizer = testing.build_tokenizer("bert")
    teacher = save_head_only(hand_made_head("mean"), tmp_path / "tuned")
    encoders = {"teacher": hand_made_encoder(tokenizer, lambda ids: torch.ones(*ids.shape, 2), RecordingTable()),
                "student": hand_made_encoder(tokenizer, lambda ids: torch.ones(*ids.shape, 3), RecordingTable())}
    with pytest.raises(EvalError, match=r"student_senses: states of width 3, but the head reads d=2"):
        task_head_metrics(config(tmp_path, teacher), encoders, {})
    other = classifier.TaskHead(2, ["maybe", "no", "yes"], "mean")
    save_head_only(other, tmp_path / "other")
    with pytest.raises(EvalError, match=r"the head's labels \['maybe', 'no', 'yes'\] are not the task's \['no', 'yes'\]"):
        task_head_metrics(config(tmp_path, tmp_path / "other"), encoders, {})
