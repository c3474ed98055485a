"""Bad input that stage-level tests do not reach cheaply: NaN states, resume with another world size."""
from collections import Counter

import numpy as np
import pytest

from dist_sense.formats import corpus, shards
from dist_sense.formats.manifest import ManifestError
from dist_sense.stages.extract import HiddenSink
from dist_sense.stages.teacher_pass import RankProgress


def window(n: int = 6) -> corpus.Window:
    return corpus.Window(doc=3, index=0, start=0, input_ids=[2] + list(range(10, 10 + n - 2)) + [3],
                         special=[True] + [False] * (n - 2) + [True], owned=[False] + [True] * (n - 2) + [False],
                         doc_pos=[-1] + list(range(n - 2)) + [-1], spans=[(0, 0)] + [(i, i + 1) for i in range(n - 2)] + [(0, 0)],
                         text="abcd")


def test_nonfinite_states_are_counted_and_never_stored(tmp_path):
    states = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    states[1, 2] = np.nan
    states[3, 0] = np.inf
    writer = shards.RankShardWriter(tmp_path, "hidden", 0, max_samples=10)
    counters: dict[str, Counter] = {}
    HiddenSink(np.ones(100), seed=0, hidden_dtype="fp32").write_batch(writer, [window()], states[None], counters)
    writer.close()
    assert counters["totals"]["nonfinite"] == 2
    (sample,) = shards.iter_hidden([tmp_path / writer.written[0]["file"]], "fp32")
    assert sample["pos"].tolist() == [2, 4]  # specials (0, 5) never kept; 1 and 3 had NaN / inf
    assert np.isfinite(sample["hidden"]).all()
    assert sum(counters["kept"].values()) == 2


def test_resume_with_another_world_size_is_refused_clearly(tmp_path):
    settings = {"cap": 10}
    RankProgress(tmp_path, rank=0, world_size=2, settings=settings).commit(None, 5, {})
    with pytest.raises(ManifestError) as err:
        RankProgress(tmp_path, rank=0, world_size=1, settings=settings)
    message = str(err.value)
    assert "progress-r000.json" in message and "started with 2 ranks, now 1" in message and str(tmp_path) in message


def test_resume_with_other_settings_is_refused(tmp_path):
    RankProgress(tmp_path, rank=0, world_size=1, settings={"cap": 10}).commit(None, 5, {})
    with pytest.raises(ManifestError, match="made with other settings"):
        RankProgress(tmp_path, rank=0, world_size=1, settings={"cap": 20})


def test_slow_point_sleeps_at_its_point_only(monkeypatch):
    from dist_sense.runtime import faults

    slept = []
    monkeypatch.setattr(faults.time, "sleep", slept.append)
    monkeypatch.setenv("DIST_SENSE_SLOW", "distill.step:0.25")
    faults.crash_point("distill.step")
    faults.crash_point("extract.batch")
    faults.crash_point("distill.step")
    assert slept == [0.25, 0.25]
