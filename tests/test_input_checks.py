"""Bad inputs refused where they enter: blank corpora, tokenizers past the embedding table,
windows past the model's positions, a string where SenseEncoder.encode wants a list."""
import json

import helpers as testing
import numpy as np
import pytest
import torch

from dist_sense.config import ConfigError, RunConfig
from dist_sense.formats.corpus import CorpusError, load_documents
from dist_sense.formats.dictionary import SenseDictionary
from dist_sense.model.encoder import SenseEncoder
from dist_sense.model.teacher import TeacherError, check_fits, check_max_length, position_limit

BLANK = ["", "   ", "\t \n ", "\u3000"]


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def launch(script, args):
    proc = testing.run_command(["python", script, *args], check=False, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- 1. a corpus with no text

@pytest.mark.parametrize("field", ["text", "body"])
def test_a_corpus_of_blank_documents_is_refused_naming_path_and_field(tmp_path, field):
    path = write_jsonl(tmp_path / "blank.jsonl", BLANK, field)
    with pytest.raises(CorpusError) as info:
        load_documents(str(path), text_field=field)
    message = str(info.value)
    assert str(path) in message and repr(field) in message and "blank" in message, message


def test_blank_within_max_documents_says_so_and_one_real_text_is_enough(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", BLANK + ["the bank of the river"])
    with pytest.raises(CorpusError, match="max_documents=3"):
        load_documents(str(path), max_documents=3)
    assert load_documents(str(path))["text"][-1] == "the bank of the river"  # blank documents beside text are fine


def test_extract_refuses_a_blank_corpus_and_writes_no_manifest(tiny_bert, tmp_path):
    path = write_jsonl(tmp_path / "blank.jsonl", BLANK)
    line = launch("launcher/extract.py", [f"run_dir={tmp_path}", f"model.teacher={tiny_bert}", f"corpus.path={path}"])
    assert str(path) in line and "'text'" in line, line
    assert not (tmp_path / "hidden" / "manifest.json").exists()


def test_label_refuses_a_blank_label_corpus_and_writes_no_manifest(tiny_bert, toy_corpus, tmp_path):
    path = write_jsonl(tmp_path / "blank.jsonl", BLANK)
    line = launch("launcher/label.py", [f"run_dir={tmp_path}", f"model.teacher={tiny_bert}",
                                        f"corpus.path={toy_corpus}", f"label.corpus_path={path}"])
    assert str(path) in line and "'text'" in line, line
    assert not (tmp_path / "labels" / "manifest.json").exists()


def test_evaluate_refuses_a_blank_held_out_corpus(toy_corpus, tmp_path):
    from dist_sense.stages.evaluate.stage import held_out_texts

    path = write_jsonl(tmp_path / "blank.jsonl", BLANK)
    cfg = RunConfig.load(None, [f"run_dir={tmp_path}", f"corpus.path={toy_corpus}", f"eval.corpus_path={path}"])
    with pytest.raises(CorpusError, match="blank") as info:
        held_out_texts(cfg, testing.build_tokenizer("bert"))
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------------- 2. tokenizer ids past the embeddings

def test_a_tokenizer_with_more_ids_than_embedding_rows_is_refused():
    tokenizer = testing.build_tokenizer("bert")
    n = len(tokenizer)
    with pytest.raises(TeacherError) as info:
        check_fits(testing.tiny_config("bert", n - 3), tokenizer, "/models/teacher", "/models/tok")
    message = str(info.value)
    for needle in ("/models/teacher", "/models/tok", f"{n} ids", f"vocab_size={n - 3}"):
        assert needle in message, message
    check_fits(testing.tiny_config("bert", n), tokenizer, "m", "t")  # the same size
    check_fits(testing.tiny_config("bert", n + 64), tokenizer, "m", "t")  # a padded, larger table: fine
    tokenizer.add_tokens(["zebra", "giraffe"])  # added tokens produce ids too
    with pytest.raises(TeacherError, match=f"{n + 2} ids"):
        check_fits(testing.tiny_config("bert", n), tokenizer, "m", "t")


def test_extract_refuses_a_tokenizer_past_the_teachers_embeddings(tiny_bert, toy_corpus, tmp_path):
    from transformers import AutoModel

    n = len(testing.build_tokenizer("bert"))
    small = tmp_path / "small_vocab"  # a teacher embedding 4 ids fewer than tiny_bert's tokenizer produces
    AutoModel.from_config(testing.tiny_config("bert", n - 4)).save_pretrained(small)
    line = launch("launcher/extract.py", [f"run_dir={tmp_path}", f"model.teacher={small}",
                                          f"model.tokenizer={tiny_bert}", f"corpus.path={toy_corpus}"])
    for needle in (str(small), str(tiny_bert), f"{n} ids", f"vocab_size={n - 4}"):
        assert needle in line, line
    assert not (tmp_path / "hidden" / "manifest.json").exists()


# ----------------------------------------------------------------------------- 3. windows past the positions

def test_position_limits_of_absolute_offset_and_rotary_models():
    from transformers import GPT2Config, RobertaConfig

    assert position_limit(testing.tiny_config("bert", 40)) == 512
    assert position_limit(testing.tiny_config("llama", 40)) == 512  # rotary: the trained context
    assert position_limit(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512  # from padding_idx + 1
    assert position_limit(GPT2Config(n_positions=1024)) == 1024
    check_max_length(512, testing.tiny_config("bert", 40), "model m")
    with pytest.raises(ConfigError) as info:
        check_max_length(513, testing.tiny_config("bert", 40), "model /models/teacher")
    assert "corpus.max_length=513" in str(info.value) and "512" in str(info.value)
    assert "/models/teacher" in str(info.value)


def test_extract_refuses_max_length_past_the_teachers_positions(tiny_llama, toy_corpus, tmp_path):
    line = launch("launcher/extract.py", [f"run_dir={tmp_path}", f"model.teacher={tiny_llama}",
                                          f"corpus.path={toy_corpus}", "corpus.max_length=600"])
    assert "corpus.max_length=600" in line and "512" in line and str(tiny_llama) in line, line
    assert not (tmp_path / "hidden" / "manifest.json").exists()


def test_a_student_with_fewer_positions_than_the_windows_is_refused(tmp_path):
    from transformers import BertConfig

    from dist_sense.model.student import StudentError, build_student

    BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=64).save_pretrained(tmp_path / "small")
    overrides = ["distill.init=model", f"distill.student_model={tmp_path / 'small'}"]
    with pytest.raises(StudentError, match="corpus.max_length=128") as info:
        build_student(RunConfig.load(None, [*overrides, "corpus.max_length=128"]), 32)
    assert "64" in str(info.value) and str(tmp_path / "small") in str(info.value)
    assert build_student(RunConfig.load(None, [*overrides, "corpus.max_length=64"]), 32).teacher_d == 32


# ----------------------------------------------------------------------------- 4. SenseEncoder.encode's batch

@pytest.fixture(scope="module")
def encoder():
    """A tiny BERT with only 16 positions and a one-sense dictionary."""
    from transformers import AutoModel

    tokenizer = testing.build_tokenizer("bert")
    torch.manual_seed(0)
    config = testing.tiny_config("bert", len(tokenizer))
    config.max_position_embeddings = 16
    model = AutoModel.from_config(config).eval()
    dictionary = SenseDictionary([tokenizer.get_vocab()["bank"]], [0, 1], np.zeros((1, 32), np.float32))
    return SenseEncoder(model, tokenizer, dictionary, lambda ids, mask: model(input_ids=ids, attention_mask=mask)
                        .last_hidden_state, device="cpu")


def test_encode_refuses_a_single_string(encoder):
    with pytest.raises(TypeError, match=r"texts: got one str .*pass a list"):
        encoder.encode("the bank of the river")
    assert len(encoder.encode(["the bank of the river"])) == 1


@pytest.mark.parametrize("item", [5, None, b"bank", ["bank"]])
def test_encode_refuses_an_item_that_is_not_a_string_naming_its_index(encoder, item):
    with pytest.raises(TypeError, match=rf"texts\[1\] is {type(item).__name__}"):
        encoder.encode(["the bank", item, "the river"])


def test_encode_cuts_texts_at_the_models_positions(encoder):
    assert encoder.max_length == 16  # not the 512 asked for
    out = encoder.encode([" ".join(["bank"] * 40)])[0]
    assert len(out.token_ids) == 16
