"""SenseEncoder on a real tiny run (extract, build_dict, label, distill): shapes, snapping, pooling, look-ups."""
import numpy as np
import pytest
import torch
from run_fixture import distilled_run  # noqa: F401  (the session's shared run)

from dist_sense.formats.dictionary import SenseDictionary
from dist_sense.model.encoder import EncodedText, SenseEncoder
from dist_sense.model.student import Student

pytestmark = pytest.mark.slow

TEXTS = [
    "the bank of the river was mud",
    "she paid the loan at the bank with cash",
    "a bat flew out of the dark cave at night",
    "the team will bat first on the field",
    "spring rain makes the green tree grow",
    "fish swim in the stream",
    "the coach saw the ball go to the field and the team run to score in the match",
    "bank",
    "money",
    "the water of the spring",
]


@pytest.fixture(scope="module")
def run_dir(distilled_run):  # noqa: F811
    return distilled_run["run_dir"]


@pytest.fixture(scope="module")
def teacher(run_dir):
    return SenseEncoder.load(run_dir, model="teacher", device="cpu")


@pytest.fixture(scope="module")
def student(run_dir):
    return SenseEncoder.load(run_dir, model="student", device="cpu")


@pytest.fixture(scope="module")
def dictionary(run_dir):
    return SenseDictionary.load(run_dir / "dictionary")


def content(out: EncodedText) -> np.ndarray:
    """Tokens that are not special: [UNK] counts as text, <s> does not (its span is empty)."""
    return np.array([end > start for start, end in out.offsets])


def test_encode_returns_every_field_with_consistent_shapes(teacher, dictionary):
    outs = teacher.encode(TEXTS, batch_size=4)
    assert len(outs) == len(TEXTS)
    for text, out in zip(TEXTS, outs):
        n = len(out.token_ids)
        assert n == len(text.split()) + 1  # word-level tokenizer plus <s>
        assert out.token_ids.dtype == np.int64 and out.sense_ids.shape == (n,)
        assert len(out.tokens) == len(out.offsets) == n
        assert out.tokens == teacher.tokenizer.convert_ids_to_tokens(out.token_ids.tolist())
        assert out.hidden.shape == out.sense_embeddings.shape == (n, dictionary.d)
        assert out.sentence_embedding.shape == out.sentence_sense_embedding.shape == (dictionary.d,)
        assert [text[a:b] for a, b in out.offsets[1:]] == text.split() and out.offsets[0] == (0, 0)


@pytest.mark.parametrize("similarity", ["dot", "cos", "l2"])
def test_sense_ids_are_the_dictionarys_nearest_senses(run_dir, dictionary, similarity):
    encoder = SenseEncoder.load(run_dir, model="teacher", similarity=similarity, device="cpu")
    checked = 0
    for out in encoder.encode(TEXTS):
        expected = dictionary.nearest(out.token_ids, out.hidden, similarity)
        np.testing.assert_array_equal(out.sense_ids, expected)
        checked += int((expected >= 0).sum())
    assert checked > 40
    assert encoder.encode(TEXTS)[0].sense_ids[0] == -1  # <s> has no entry


def test_sense_embeddings_are_the_snapped_centres(teacher, dictionary):
    for out in teacher.encode(TEXTS):
        for i, (token, sense) in enumerate(zip(out.token_ids, out.sense_ids)):
            if sense >= 0:
                np.testing.assert_allclose(out.sense_embeddings[i], dictionary.senses(int(token))[sense], rtol=1e-6)
            else:  # no entry: the continuous state stands in
                np.testing.assert_array_equal(out.sense_embeddings[i], out.hidden[i])


def test_sentence_embeddings_are_means_over_non_special_tokens(teacher, student):
    for encoder in (teacher, student):
        for out in encoder.encode(TEXTS):
            keep = content(out)
            assert 0 < keep.sum() < len(keep)
            np.testing.assert_allclose(out.sentence_embedding, out.hidden[keep].mean(0), atol=1e-5)
            np.testing.assert_allclose(out.sentence_sense_embedding, out.sense_embeddings[keep].mean(0), atol=1e-5)


def test_batching_does_not_change_results(teacher, student):
    for encoder in (teacher, student):
        one, eight = encoder.encode(TEXTS, batch_size=1), encoder.encode(TEXTS, batch_size=8)
        for a, b in zip(one, eight):
            np.testing.assert_array_equal(a.token_ids, b.token_ids)
            np.testing.assert_array_equal(a.sense_ids, b.sense_ids)
            assert a.offsets == b.offsets
            np.testing.assert_allclose(a.hidden, b.hidden, atol=1e-5)
            np.testing.assert_allclose(a.sentence_sense_embedding, b.sentence_sense_embedding, atol=1e-5)


def test_a_left_padding_tokenizer_gives_the_same_encoding(teacher):
    alone = [teacher.encode([t])[0] for t in TEXTS[:2]]
    teacher.tokenizer.padding_side = "left"
    try:
        together = teacher.encode(TEXTS[:2], batch_size=2)
    finally:
        teacher.tokenizer.padding_side = "right"
    for a, b in zip(alone, together):
        assert a.tokens == b.tokens
        np.testing.assert_allclose(a.hidden, b.hidden, atol=1e-5)


def test_senses_lists_counts_and_examples(teacher, dictionary):
    (entry,) = teacher.senses("bank")
    assert entry["token"] == "bank" and entry["token_id"] in dictionary
    counts = [s["count"] for s in entry["senses"]]
    assert len(counts) == dictionary.num_senses[dictionary.token_to_row[entry["token_id"]]] >= 2
    assert all(c > 0 for c in counts) and counts == sorted(counts, reverse=True)  # most frequent first
    assert [s["sense"] for s in entry["senses"]] == list(range(len(counts)))
    examples = [x for s in entry["senses"] for x in s["examples"]]
    assert examples and all("[[bank]]" in x for x in examples)
    (unknown,) = teacher.senses("zebra")  # out of vocabulary: [UNK] has no senses
    assert unknown["senses"] == []


def test_disambiguate_returns_a_sense_and_its_examples(teacher, dictionary):
    text = "the boat hit the bank of the river"
    found = teacher.disambiguate(text, "bank")
    expected = teacher.encode([text])[0].sense_ids[5]  # <s> the boat hit the bank
    assert found["token"] == "bank" and found["position"] == 5 and found["sense"] == expected >= 0
    assert found["examples"] == dictionary.examples(found["token_id"])[found["sense"]]
    with pytest.raises(ValueError, match="'cave'"):
        teacher.disambiguate(text, "cave")


def test_load_teacher_and_student(teacher, student, dictionary):
    assert isinstance(student.model, Student) and not isinstance(teacher.model, Student)
    assert student.model.info["layers"] == 1 < teacher.model.config.num_hidden_layers
    t, s = teacher.encode(TEXTS[:1])[0], student.encode(TEXTS[:1])[0]
    np.testing.assert_array_equal(t.token_ids, s.token_ids)
    assert s.hidden.shape == t.hidden.shape and not np.allclose(s.hidden, t.hidden)
    assert (s.sense_ids[1:] >= 0).all()


def test_return_tensors_pt_gives_tensors(student):
    arrays = student.encode(TEXTS[:3])
    tensors = student.encode(TEXTS[:3], return_tensors="pt")
    for a, t in zip(arrays, tensors):
        for field in ("token_ids", "sense_ids", "sense_embeddings", "hidden", "sentence_embedding",
                      "sentence_sense_embedding"):
            value = getattr(t, field)
            assert isinstance(value, torch.Tensor) and value.device.type == "cpu"
            np.testing.assert_array_equal(value.numpy(), getattr(a, field))
