"""The student: truncation keeps the teacher's weights, a separate model gets a linear map, save/load."""
import json

import helpers as testing
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from dist_sense.config import ConfigError, RunConfig
from dist_sense.model.student import StudentError, build_student, check_vocabulary, load_student, save_student

IDS = torch.tensor([[4, 10, 11, 12, 13], [4, 20, 21, 22, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])


def config(teacher, **distill) -> RunConfig:
    cfg = RunConfig()
    cfg.model.teacher = str(teacher)
    for key, value in distill.items():
        setattr(cfg.distill, key, value)
    return cfg


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_truncate_keeps_the_first_layers_weights(kind, tmp_path):
    teacher_dir = testing.save_tiny_model(tmp_path / kind, kind=kind, layers=3)
    teacher = AutoModel.from_pretrained(teacher_dir).eval()
    student = build_student(config(teacher_dir, layers=2), teacher_d=32).eval()
    assert len(student.backbone.layers if kind == "llama" else student.backbone.encoder.layer) == 2
    theirs = teacher.state_dict()
    mine = student.backbone.state_dict()
    assert any(".1." in k for k in mine) and not any(".2." in k for k in mine)
    for name, tensor in mine.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=0, msg=name)
    with torch.no_grad():
        out = student(IDS, MASK)
        hidden = teacher(input_ids=IDS, attention_mask=MASK, output_hidden_states=True).hidden_states[2]
    # A decoder keeps its final norm on top of layer 2; an encoder's layer-2 output is its output.
    expected = teacher.norm(hidden) if kind == "llama" else hidden
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert student.info["head"] == "identity" and student.teacher_d == 32


def test_separate_model_from_config_maps_to_teacher_width(tiny_llama, tmp_path):
    small = testing.tiny_config("llama", vocab_size=len(AutoTokenizer.from_pretrained(tiny_llama)), hidden=16, layers=1)
    small.save_pretrained(tmp_path / "small")
    for spec in (tmp_path / "small", tmp_path / "small" / "config.json"):
        student = build_student(config(tiny_llama, init="model", student_model=str(spec)), teacher_d=32)
        assert isinstance(student.head, torch.nn.Linear) and student.head.weight.shape == (32, 16)
        assert student(IDS, MASK).shape == (2, 5, 32)
        assert student.info["student_d"] == 16 and student.info["init"] == "model"


def test_separate_model_with_weights_loads_them(tiny_bert):
    student = build_student(config(tiny_bert, init="model", student_model=str(tiny_bert)), teacher_d=48)
    teacher = AutoModel.from_pretrained(tiny_bert)
    torch.testing.assert_close(student.backbone.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight)
    assert student.backbone.pooler is None  # never trained, so ZeRO-2 never sees a gradient-less parameter
    assert student(IDS, MASK).shape == (2, 5, 48)


@pytest.mark.parametrize("init", ["truncate", "model"])
def test_save_load_round_trip_gives_identical_outputs(init, tiny_llama, tmp_path):
    cfg = config(tiny_llama, layers=1, init=init, student_model=str(tiny_llama))
    student = build_student(cfg, teacher_d=32 if init == "truncate" else 24).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    out = save_student(student, tmp_path / "s", tokenizer, extra={"steps": 7})
    info = json.loads((out / "student.json").read_text())
    assert info["steps"] == 7 and info["init"] == init and (out / "head.pt").is_file()
    assert (out / "tokenizer.json").is_file()
    loaded = load_student(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS, MASK), student(IDS, MASK), rtol=0, atol=0)
    # A saved student can seed a new run (init=model), head included, when the width matches.
    again = build_student(config(tiny_llama, init="model", student_model=str(out)), teacher_d=loaded.teacher_d)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(IDS, MASK), student(IDS, MASK), rtol=0, atol=0)


def test_errors_name_what_is_wrong(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match=r"distill.layers=3: the teacher .* has only 2 layers"):
        build_student(config(tiny_llama, layers=3), teacher_d=32)
    with pytest.raises(StudentError, match=r"32 wide but the dictionary is 16 wide"):
        build_student(config(tiny_llama, layers=1), teacher_d=16)
    with pytest.raises(StudentError, match=r"distill.student_model=/nonexistent/student"):
        build_student(config(tiny_llama, init="model", student_model="/nonexistent/student"), teacher_d=32)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(StudentError, match=r"student_model=.*broken"):
        build_student(config(tiny_llama, init="model", student_model=str(broken)), teacher_d=32)
    saved = save_student(build_student(config(tiny_llama, init="model", student_model=str(tiny_llama)), 24),
                         tmp_path / "saved")
    with pytest.raises(StudentError, match=r"head maps to 24 dimensions, the dictionary has 32"):
        build_student(config(tiny_llama, init="model", student_model=str(saved)), teacher_d=32)
    with pytest.raises(StudentError, match=r"student.json: not found"):
        load_student(tiny_llama)


def test_student_must_cover_the_tokenizer(tiny_llama, tmp_path):
    small = testing.tiny_config("llama", vocab_size=10, hidden=16, layers=1)
    small.save_pretrained(tmp_path / "small")
    student = build_student(config(tiny_llama, init="model", student_model=str(tmp_path / "small")), teacher_d=32)
    with pytest.raises(StudentError, match=r"vocab_size=10 but the teacher's tokenizer has \d+ ids"):
        check_vocabulary(student, AutoTokenizer.from_pretrained(tiny_llama))
