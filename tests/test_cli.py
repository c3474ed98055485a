"""The one entry of every launcher: input errors are one line and exit code 2, bugs keep their traceback."""
from __future__ import annotations

import pytest

from dist_sense import cli
from dist_sense.formats.corpus import CorpusError
from dist_sense.formats.labels import LabelsError
from dist_sense.model.teacher import TeacherError


def fail_with(error):
    def stage(cfg):
        raise error

    return stage


@pytest.mark.parametrize("error", [CorpusError("docs.jsonl: line 3 is not JSON"),
                                   TeacherError("/models/x: no config.json"),
                                   LabelsError("labels/manifest.json: format is 'x'")])
def test_an_input_error_is_one_line_and_exit_code_2(error, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.run_stage("test", fail_with(error), [f"run_dir={tmp_path}"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error [rank 0]: {error}" and "Traceback" not in err


def test_a_bug_keeps_its_traceback(tmp_path, capsys):
    with pytest.raises(ZeroDivisionError):
        cli.run_stage("test", fail_with(ZeroDivisionError("a bug")), [f"run_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert "a bug, not an input error" in err and "Traceback" in err and "ZeroDivisionError: a bug" in err


def test_the_stage_gets_the_parsed_config_and_its_output_is_printed(tmp_path, capsys):
    seen = {}

    def stage(cfg):
        seen["k"] = cfg.kmeans.k
        return tmp_path / "out"

    assert cli.run_stage("test", stage, [f"run_dir={tmp_path}", "kmeans.k=7"]) == tmp_path / "out"
    assert seen == {"k": 7} and capsys.readouterr().out.strip() == str(tmp_path / "out")


def test_a_bad_override_is_a_config_error_naming_the_key(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.run_stage("test", fail_with(AssertionError("never run")), [f"run_dir={tmp_path}", "kmeans.k=0"])
    assert stop.value.code == 2 and "kmeans.k" in capsys.readouterr().err
