import json

import pytest

from dist_sense.config import ConfigError, KMeansConfig, RunConfig, describe, field_docs


def test_defaults_validate_and_roundtrip(tmp_path):
    cfg = RunConfig(run_dir=str(tmp_path / "run")).validate()
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
