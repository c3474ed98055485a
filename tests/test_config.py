import dataclasses
import json
from pathlib import Path

import pytest

from dist_sense.config import (
    ConfigError,
    CorpusConfig,
    DistillConfig,
    KMeansConfig,
    MemoryConfig,
    RunConfig,
    describe,
    field_docs,
)


def test_defaults_validate_and_roundtrip(tmp_path):
    cfg = RunConfig(run_dir=str(tmp_path / "run"))
    path = cfg.save()
    assert path == tmp_path / "run" / "config.json"
    again = RunConfig.load(path)
    assert again == cfg


def test_json_then_dotted_overrides(tmp_path):
    src = tmp_path / "c.json"
    src.write_text(json.dumps({"run_dir": "r", "kmeans": {"k": 7}, "model": {"teacher": "/m"}}))
    cfg = RunConfig.load(src, ["kmeans.k=5", "kmeans.spherical=true", "extract.stop_tokens=the,a", "corpus.path=/data/x.txt"])
    assert cfg.kmeans.k == 5 and cfg.kmeans.spherical is True
    assert cfg.extract.stop_tokens == ["the", "a"]
    assert cfg.corpus.path == "/data/x.txt" and cfg.model.teacher == "/m"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("kmeans.kk=3", "unknown key kmeans.kk; valid keys here: kmeans.k_policy"),
        ("nosuch=1", "unknown key nosuch"),
        ("kmeans.k=0", "kmeans.k=0: must be > 0"),
        ("kmeans.k=three", "kmeans.k='three' is not a valid int"),
        ("extract.cap=-5", "extract.cap=-5"),
        ("model.layer=1.5", "model.layer=1.5 is not a valid int"),
        ("model.dtype=fp64", "model.dtype='fp64': must be one of fp32, bf16, fp16"),
        ("distill.micro_batch_size=0", "distill.micro_batch_size=0"),
        ("corpus.stride=500", "corpus.stride=500"),
        ("kmeans", "expected key=value"),
    ],
)
def test_bad_keys_and_values_name_the_field(override, needle):
    with pytest.raises(ConfigError) as err:
        RunConfig.load(None, [override])
    assert needle in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        RunConfig.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        RunConfig.load(bad)
    bad.write_text(json.dumps({"kmeans": 3}))
    with pytest.raises(ConfigError, match="kmeans must be an object"):
        RunConfig.load(bad)


def test_every_field_is_documented():
    docs = field_docs(KMeansConfig)
    assert docs["k"].startswith("Senses per token")
    listing = describe()
    assert "kmeans.k=20" in listing and "distill.global_batch_size=16" in listing
    for line in listing.splitlines():
        assert line.split("# ", 1)[1].strip(), f"undocumented field: {line}"


@pytest.mark.parametrize(
    "build, needle",
    [
        (lambda: KMeansConfig(k=0), "kmeans.k=0: must be > 0"),
        (lambda: KMeansConfig(k="three"), "kmeans.k='three' is not a valid int"),
        (lambda: CorpusConfig(max_length=64, stride=64), "corpus.stride=64: must be >= 0 and < corpus.max_length=64"),
        (lambda: MemoryConfig(spill_mb=-1), "memory.spill_mb=-1: must be >= 0"),
        (lambda: DistillConfig(init="model"), "distill.init=model needs distill.student_model"),
        (lambda: RunConfig(run_dir=""), "run_dir: must not be empty"),
        (lambda: RunConfig(kmeans={"k": 3}), "kmeans: must be a KMeansConfig"),
        (lambda: dataclasses.replace(KMeansConfig(), mcl_inflation=1.0), "kmeans.mcl_inflation=1.0: must be > 1"),
        (lambda: dataclasses.replace(RunConfig(), corpus=CorpusConfig(max_length=8, stride=2), run_dir=""), "run_dir"),
    ],
)
def test_an_invalid_config_cannot_be_constructed(build, needle):
    with pytest.raises(ConfigError) as err:
        build()
    assert needle in str(err.value)


def test_a_section_changed_in_place_is_checked_again_when_a_config_is_built_from_it():
    cfg = RunConfig()
    cfg.corpus.stride = 500  # attribute assignment is not checked; building a config from it is
    with pytest.raises(ConfigError, match="corpus.stride=500"):
        dataclasses.replace(cfg, run_dir="elsewhere")
    assert KMeansConfig(k=3.0, spherical="true").k == 3  # coerced as from JSON
    assert RunConfig(run_dir=Path("/r")).run_dir == "/r"


def test_memory_budgets_are_their_own_section_and_the_old_keys_say_where_they_went(tmp_path):
    cfg = RunConfig.load(None, ["memory.spill_mb=0", "memory.held_results_mb=64"])
    assert (cfg.memory.spill_mb, cfg.memory.held_results_mb) == (0, 64)
    assert not {"spill_memory_mb", "held_results_mb"} & set(dataclasses.asdict(cfg.kmeans))
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"kmeans": {"k": 5, "spill_memory_mb": 128}}))
    with pytest.raises(ConfigError, match=r"old.json: kmeans.spill_memory_mb has moved to memory.spill_mb"):
        RunConfig.load(old)
    with pytest.raises(ConfigError, match=r"kmeans.held_results_mb has moved to memory.held_results_mb"):
        RunConfig.load(None, ["kmeans.held_results_mb=0"])
    listing = describe()
    for key in ("memory.spill_mb=512  # Hidden rows a rank holds", "memory.held_results_mb=256  # Finished tiles held"):
        assert key in listing
    assert "kmeans.spill_memory_mb" not in listing


@pytest.mark.parametrize(
    "global_batch, micro, world, accumulation",
    [
        (48, 2, 1, 24), (48, 2, 2, 12), (48, 2, 3, 8), (48, 2, 4, 6), (48, 2, 8, 3),
        (16, 4, 1, 4), (16, 4, 2, 2), (16, 4, 4, 1),
        (16, 4, 3, None), (16, 4, 8, None), (16, 3, 1, None), (24, 8, 2, None), (24, 3, 8, 1),
    ],
)
def test_accumulation_steps_across_world_sizes(global_batch, micro, world, accumulation):
    distill = DistillConfig(global_batch_size=global_batch, micro_batch_size=micro)
    if accumulation is None:
        needle = (f"distill.global_batch_size={global_batch} is not a multiple of distill.micro_batch_size={micro} "
                  f"x world size {world} = {micro * world}")
        for method in (distill.accumulation_steps, distill.batch_split):
            with pytest.raises(ConfigError) as err:
                method(world)
            assert needle in str(err.value)
        return
    assert distill.accumulation_steps(world) == accumulation
    assert distill.batch_split(world) == (micro, accumulation)
    assert micro * accumulation * world == global_batch


def test_a_world_of_no_ranks_is_named():
    with pytest.raises(ConfigError, match="world size 0: must be >= 1"):
        DistillConfig().accumulation_steps(0)
