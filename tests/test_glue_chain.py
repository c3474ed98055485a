"""The GLUE setting end to end on a tiny BERT, with the real launchers: tune the teacher, build its
dictionary, distil a separate narrower student (init=model, a linear map to the teacher's width),
tune the same student architecture directly on the labels, and judge every system through the
tuned teacher's frozen head."""
import json

import helpers as testing
import numpy as np
import pytest
from run_fixture import run_together
from test_finetune import TOPIC_NAMES, task_files  # noqa: F401  (the module's task files)
from test_finetune import args_for as task_args

from dist_sense.model import classifier
from dist_sense.stages.evaluate.task_head import METRICS, TASK_SYSTEMS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def glue_run(tmp_path_factory, tiny_bert, task_files):  # noqa: F811
    root = tmp_path_factory.mktemp("glue")
    run_dir = root / "run"
    small = root / "small"
    testing.tiny_config("bert", len(testing.build_tokenizer("bert")), hidden=16, layers=1).save_pretrained(small)
    tuned = run_dir / "teacher_tuned" / "final"
    # One config for the whole chain: model.teacher is the tuned teacher, finetune.teacher the base it is tuned from.
    args = task_args(run_dir, tuned, task_files, **{
        "finetune.teacher": tiny_bert, "finetune.pooling": "mean", "corpus.path": task_files["train"],
        "corpus.text_field": "sentence", "corpus.max_length": 16, "extract.cap": 30, "kmeans.k": 3,
        "label.batch_size": 8, "label.store_hidden": "true", "distill.init": "model", "distill.student_model": small,
        "distill.steps": 20, "distill.global_batch_size": 8, "distill.micro_batch_size": 8, "distill.lr": 2e-3,
        "distill.eval_every": 0, "distill.save_every": 20, "eval.corpus_path": task_files["test"],
        "eval.max_documents": 40, "eval.batch_size": 8, "eval.own_head_examples": 100})
    for stage in ("finetune", "extract", "build_dict", "label"):
        testing.run_command(["python", f"launcher/{stage}.py", *args], timeout=400)
    run_together([["python", "launcher/distill.py", *args], ["python", "launcher/distill.py", *args, "distill.loss=mse"],
                  ["python", "launcher/finetune.py", *args, "finetune.backbone=student"]])
    testing.run_command(["python", "launcher/evaluate.py", *args], timeout=400)
    return run_dir


def test_every_system_and_both_baselines_are_judged(glue_run):
    metrics = json.loads((glue_run / "eval" / "metrics.json").read_text())
    for system in TASK_SYSTEMS:
        for measure in METRICS:
            value = metrics[f"task.topics.{system}.{measure}"]
            assert value is not None, (system, measure)
            assert value > 0 if measure == "ratio_to_teacher" else 0 <= value <= 1, (system, measure, value)
    # The teacher through its own frozen head is the tuned model: its test accuracy, as fine-tuning scored it.
    head = json.loads((glue_run / "teacher_tuned" / "final" / classifier.HEAD_INFO).read_text())
    assert metrics["task.topics.teacher.accuracy"] == pytest.approx(head["accuracy"]["test"])
    assert metrics["task.topics.teacher.ratio_to_teacher"] == 1.0
    tuned = json.loads((glue_run / "student_tuned" / "final" / classifier.HEAD_INFO).read_text())
    assert metrics["task.topics.student_tuned.accuracy"] == pytest.approx(tuned["accuracy"]["test"])
    # Topics are told apart by word identity: the tuned teacher and the sense systems are well above chance.
    chance = 1 / len(TOPIC_NAMES)
    for system in ("teacher", "teacher_senses", "student_senses"):
        assert metrics[f"task.topics.{system}.accuracy"] > chance + 0.2, system
    details = json.loads((glue_run / "eval" / "details.json").read_text())
    assert details["task_head"]["pooling"] == "mean" and details["task_head"]["examples"] == 32
    assert details["task_head"]["own_head_examples"] == 100 and "student_tuned" not in details["skipped"]


def test_the_distilled_student_is_the_separate_model_with_its_map(glue_run):
    for part in ("student", "student_mse", "student_tuned"):
        info = json.loads((glue_run / part / "final" / "student.json").read_text())
        assert (info["init"], info["student_d"], info["teacher_d"], info["head"]) == ("model", 16, 32, "linear"), part


def test_the_report_shows_the_table_first(glue_run):
    report = (glue_run / "eval" / "report.md").read_text()
    assert report.index("Through the tuned teacher's head") < report.index("## Held-out text")
    metrics = json.loads((glue_run / "eval" / "metrics.json").read_text())
    for system in TASK_SYSTEMS:
        accuracy = metrics[f"task.topics.{system}.accuracy"]
        assert f"| topics | {system} | {accuracy:.4f} |" in report, system
    assert "pooling: mean" in report and np.isfinite(metrics["task.topics.student_senses.stderr"])
