"""Stage 4 on a real tiny run: every metric present and in range, the report, the MSE baseline, errors."""
import json
import math

import helpers as testing
import pytest
from run_fixture import distilled_run  # noqa: F401  (the session's shared run)

from dist_sense.config import RunConfig
from dist_sense.stages.evaluate import stage as evaluate

pytestmark = pytest.mark.slow

SYSTEMS = ("teacher", "teacher_senses", "student_senses", "student_no_kd", "student_mse")
SCORES = [f"downstream.{task}.{system}" for task in ("topic", "wic") for system in SYSTEMS]
FRACTIONS = ["fidelity.coverage", "agreement.top1", "agreement.top5"]
POSITIVE = ["size.teacher_params", "size.student_params", "size.dictionary_bytes",
            "speed.teacher_tokens_per_s", "speed.student_tokens_per_s"]
SNAPPING = [f"snapping.{task}.{sim}" for task in ("topic", "wic") for sim in ("dot", "cos", "l2")]
MTEB = [f"mteb.topics.{system}" for system in SYSTEMS]
KEYS = {"fidelity.mean_cos", *FRACTIONS, *SCORES, *POSITIVE, *SNAPPING, *MTEB, "eval.held_out_source",
        "eval.held_out_is_training_corpus", "eval.similarity"}


@pytest.fixture(scope="module")
def evaluated(distilled_run):  # noqa: F811
    """The launcher run on the shared run (its config.json already names the probes)."""
    from run_fixture import write_topic_probe

    run_dir = distilled_run["run_dir"]
    # An MTEB task on local files: topic sentences, fixed train and test splits.
    task = run_dir.parent / "mteb" / "topics"
    task.mkdir(parents=True, exist_ok=True)
    write_topic_probe(task / "train.jsonl", n=60, seed=21)
    write_topic_probe(task / "test.jsonl", n=40, seed=22)
    testing.run_command(["python", "launcher/evaluate.py", f"run_dir={run_dir}", f'eval.mteb_tasks=["{task}"]'],
                        timeout=300)
    return run_dir, json.loads((run_dir / "eval" / "metrics.json").read_text())


def sibling_run(distilled_run, tmp_path, parts=("dictionary", "student")):  # noqa: F811
    """A run directory sharing some of the fixture run's parts (symlinked)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for part in parts:
        (tmp_path / part).symlink_to(distilled_run["run_dir"] / part)
    return tmp_path


def test_metrics_has_every_key_in_range(evaluated, distilled_run):  # noqa: F811
    _, metrics = evaluated
    assert set(metrics) == KEYS
    assert -1 <= metrics["fidelity.mean_cos"] <= 1 and metrics["fidelity.mean_cos"] > 0.5
    for key in FRACTIONS + SCORES + SNAPPING:
        assert 0 <= metrics[key] <= 1, key
    # The configured similarity (l2 by default) is teacher_senses itself; the others are scored beside it.
    assert metrics["eval.similarity"] == "l2"
    for task in ("topic", "wic"):
        assert metrics[f"snapping.{task}.l2"] == metrics[f"downstream.{task}.teacher_senses"]
    assert metrics["agreement.top1"] <= metrics["agreement.top5"]
    assert metrics["fidelity.coverage"] > 0.9  # the held-out text is the training corpus here
    for key in POSITIVE:
        assert metrics[key] > 0 and math.isfinite(metrics[key]), key
    assert metrics["size.student_params"] < metrics["size.teacher_params"]
    # Topics are easy to tell apart from word identity alone: every system beats chance (0.2) clearly.
    assert all(metrics[f"downstream.topic.{s}"] > 0.4 for s in SYSTEMS)
    # mteb's own classification (8 examples per label, 10 draws) on the local task, each system scored.
    assert all(0.3 < metrics[key] <= 1 for key in MTEB), {key: metrics[key] for key in MTEB}
    run_dir = distilled_run["run_dir"]
    for system in SYSTEMS:
        result = json.loads((run_dir / "eval" / "mteb" / "topics" / f"{system}.json").read_text())
        assert result["scores"]["test"][0]["accuracy"] == pytest.approx(metrics[f"mteb.topics.{system}"])
    assert metrics["eval.held_out_is_training_corpus"] is True
    assert metrics["eval.held_out_source"] == str(distilled_run["docs"])


def test_report_and_tensorboard(evaluated):
    run_dir, metrics = evaluated
    report = (run_dir / "eval" / "report.md").read_text()
    for name in (*SYSTEMS, "fidelity.mean_cos", "agreement.top1", "Speed", "speedup", "### bank", "[[bank]]"):
        assert name in report, name
    assert f"{metrics['speed.student_tokens_per_s'] / metrics['speed.teacher_tokens_per_s']:.2f}x" in report
    assert "training corpus" in report or "were built from" in report
    assert list((run_dir / "tb" / "eval").glob("events.out.tfevents.*"))
    details = json.loads((run_dir / "eval" / "details.json").read_text())
    assert details["wic"]["pairs"] == 60 and details["probes"]["topic"]["examples"] == 120
    # The picture of a few ambiguous words' senses, and every sense centre for the projector.
    assert "Snapping similarity" in report and "![senses](senses.png)" in report
    assert (run_dir / "eval" / "senses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert details["figures"]["plotted_words"] and set(details["figures"]["plotted_words"]) <= set(details["wic"]["words"])
    projector = run_dir / "tb" / "senses"
    assert (projector / "projector_config.pbtxt").is_file()
    metadata = (projector / "00000" / "senses" / "metadata.tsv").read_text().splitlines()
    assert metadata[0].split("\t") == ["token", "token_id", "sense", "count", "example"] and len(metadata) > 1


def test_without_mse_student_that_system_is_null(distilled_run, tmp_path):  # noqa: F811
    run_dir = sibling_run(distilled_run, tmp_path / "run")
    held_out = testing.write_toy_corpus(tmp_path / "held_out.jsonl", n_docs=12, seed=99)
    cfg = RunConfig.load(distilled_run["run_dir"] / "config.json",
                         [f"run_dir={run_dir}", f"eval.corpus_path={held_out}", "eval.max_documents=12"])
    evaluate.run(cfg)
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert set(metrics) == KEYS - set(MTEB)  # no eval.mteb_tasks here: no mteb scores
    assert metrics["downstream.topic.student_mse"] is None and metrics["downstream.wic.student_mse"] is None
    assert metrics["downstream.topic.student_senses"] is not None
    assert metrics["eval.held_out_is_training_corpus"] is False
    assert metrics["eval.held_out_source"] == str(held_out)
    report = (run_dir / "eval" / "report.md").read_text()
    assert "student_mse is n/a" in report and str(run_dir / "student_mse" / "final") in report


def test_a_named_mse_student_that_is_missing_is_an_error(distilled_run, tmp_path):  # noqa: F811
    run_dir = sibling_run(distilled_run, tmp_path / "run")
    missing = tmp_path / "nowhere"
    overrides = [f"run_dir={run_dir}", f"eval.mse_student={missing}"]
    cfg = RunConfig.load(distilled_run["run_dir"] / "config.json", overrides)
    with pytest.raises(evaluate.EvalError, match=str(missing)):
        evaluate.run(cfg)


def test_missing_student_is_a_clear_error(distilled_run, tmp_path):  # noqa: F811
    run_dir = sibling_run(distilled_run, tmp_path / "run", parts=("dictionary",))
    (run_dir / "config.json").write_text((distilled_run["run_dir"] / "config.json").read_text())
    proc = testing.run_command(["python", "launcher/evaluate.py", f"--config={run_dir / 'config.json'}",
                                f"run_dir={run_dir}"], check=False, timeout=120)
    assert proc.returncode == 2
    assert str(run_dir / "student" / "final") in proc.stderr and "distill" in proc.stderr
    assert not (run_dir / "eval" / "metrics.json").exists()


def test_the_teacher_head_table_comes_first_in_the_report(tmp_path):
    from dist_sense.stages.evaluate.report import write_report

    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    metrics = {"task.movies.teacher.accuracy": 0.75, "task.movies.teacher.stderr": 0.02,
               "task.movies.teacher.macro_f1": 0.74, "task.movies.teacher.ratio_to_teacher": 1.0,
               "task.movies.teacher.own_head_accuracy": 0.71,
               "task.movies.student_senses.accuracy": 0.6, "task.movies.student_senses.ratio_to_teacher": 0.8,
               "eval.held_out_source": "docs.jsonl"}
    (eval_dir / "metrics.json").write_text(json.dumps(metrics))
    (eval_dir / "details.json").write_text(json.dumps({"task_head": {"pooling": "first_token", "split": "test"}}))
    text = write_report(tmp_path).read_text()
    assert text.index("Through the tuned teacher's head") < text.index("## Held-out text")
    assert "| movies | teacher | 0.7500 | 0.0200 | 0.7400 | 1.000 | 0.7100 |" in text
    assert "| movies | student_senses | 0.6000 | n/a | n/a | 0.800 | n/a |" in text and "pooling: first_token" in text
