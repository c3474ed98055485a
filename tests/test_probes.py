"""Evaluation metrics on hand-made cases: probes, fidelity/agreement counts, WiC helpers."""
import numpy as np
import pytest

from dist_sense.formats.dictionary import SenseDictionary
from dist_sense.model.encoder import EncodedText
from dist_sense.stages.evaluate.probes import EvalError, content_mask, probe_accuracies, row_cosine, token_at
from dist_sense.stages.evaluate.stage import batch_stats


def test_probe_scores_a_separable_task_perfectly_and_noise_near_chance():
    rng = np.random.default_rng(0)
    labels = np.array(["a", "b", "c"] * 100)
    separable = rng.normal(size=(300, 8)) * 0.1
    separable[np.arange(300), np.searchsorted(["a", "b", "c"], labels)] += 5.0  # one feature per class
    noise = rng.normal(size=(300, 8))
    scores = probe_accuracies({"separable": separable, "noise": noise}, list(labels), "hand-made")
    assert scores["separable"] == 1.0
    assert 0.2 < scores["noise"] < 0.47  # chance is 1/3
    with pytest.raises(EvalError, match="at least 5 examples"):
        probe_accuracies({"x": noise[:3]}, ["a", "b", "a"], "tiny.jsonl")


def encoded(ids, hidden, senses, sense_embeddings, special_first=True) -> EncodedText:
    n = len(ids)
    offsets = [(0, 0)] + [(i, i + 1) for i in range(1, n)] if special_first else [(i, i + 1) for i in range(n)]
    hidden = np.asarray(hidden, dtype=np.float32)
    return EncodedText(token_ids=np.asarray(ids), tokens=[str(i) for i in ids], sense_ids=np.asarray(senses),
                       sense_embeddings=np.asarray(sense_embeddings, dtype=np.float32), hidden=hidden,
                       sentence_embedding=hidden.mean(0), sentence_sense_embedding=hidden.mean(0), offsets=offsets)


def test_fidelity_and_agreement_counts_by_hand():
    # Token 5 has senses e1 and e2, token 6 has one sense e1; token 7 has no entry.
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    dictionary = SenseDictionary(np.array([5, 6]), np.array([0, 2, 3]), np.array([e1, e2, e1], dtype=np.float32))
    # Teacher: position 0 is special; 5 -> sense 1 (state [0, 2]: cos 1 with e2), 6 -> sense 0 (state [1, 1]:
    # cos 1/sqrt(2) with e1), 7 has no entry (counts as content, not as labelled).
    taught = [encoded([1, 5, 6, 7], [[9, 9], [0, 2], [1, 1], [3, 3]], [-1, 1, 0, -1],
                      [[9, 9], e2, e1, [3, 3]])]
    # Student: picks sense 0 for token 5 (wrong), sense 0 for token 6 (right).
    student = [encoded([1, 5, 6, 7], [[9, 9], [2, 0], [1, 0], [3, 3]], [-1, 0, 0, -1], [[9, 9], e1, e1, [3, 3]])]
    cos_sum, labelled, content, top1, top5 = batch_stats(taught, student, dictionary, "l2")
    assert (labelled, content, top1, top5) == (2, 3, 1, 2)  # both teacher senses are in the student's top 5
    assert cos_sum == pytest.approx(1 + 1 / np.sqrt(2))


def test_wic_helpers_by_hand():
    text = encoded([1, 5, 6], [[1, 0], [0, 1], [1, 1]], [-1, 0, 0], [[1, 0], [0, 1], [1, 1]])
    assert content_mask(text).tolist() == [False, True, True]
    assert token_at(text, 2, 3) == 2 and token_at(text, 0, 1) == -1  # a special token never covers text
    np.testing.assert_allclose(row_cosine(np.array([[1.0, 0], [1, 1]]), np.array([[0.0, 3], [2, 2]])), [0.0, 1.0])
