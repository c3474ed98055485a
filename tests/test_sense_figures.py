"""sense_figures on a tiny in-memory encoder: occurrences, the PCA figure, the projector export."""
import re
import sys

import helpers as testing
import numpy as np
import pytest
import torch

from dist_sense.formats.dictionary import SenseDictionary
from dist_sense.model.encoder import SenseEncoder
from dist_sense.stages.evaluate import figures as sense_figures
from dist_sense.stages.evaluate.figures import export_projector, plot_senses, word_occurrences

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TEXTS = testing.toy_sentences(120, seed=3) + [
    "BANK robbers ran to the river",  # [UNK] to the lowercase word-level tokenizer: not bank's token
    "the riverbank and the banks",  # no whole-word "bank"
    "a cave at night",
]


def kmeans(vectors: np.ndarray, k: int, iterations: int = 20) -> np.ndarray:
    """Plain Lloyd's k-means from the first k distinct vectors: deterministic, enough for a test."""
    centres = vectors[:k].copy()
    for _ in range(iterations):
        nearest = ((vectors[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        centres = np.stack([vectors[nearest == c].mean(0) if (nearest == c).any() else centres[c] for c in range(k)])
    return centres


@pytest.fixture(scope="module")
def encoder():
    """A 2-layer, hidden-32 BERT from config and a dictionary built on its own states: bank 3
    senses, bat 2, river 1 (too few to draw)."""
    from transformers import AutoModel

    tokenizer = testing.build_tokenizer("bert")
    torch.manual_seed(0)
    model = AutoModel.from_config(testing.tiny_config("bert", len(tokenizer))).eval()

    def forward(ids, mask):
        return model(input_ids=ids, attention_mask=mask).last_hidden_state

    vocab = tokenizer.get_vocab()
    placeholder = SenseDictionary([vocab["the"]], [0, 1], np.zeros((1, 32), np.float32))
    states: dict[int, list] = {}
    for out in SenseEncoder(model, tokenizer, placeholder, forward, device="cpu").encode(TEXTS):
        for token, vector in zip(out.token_ids, out.hidden):
            states.setdefault(int(token), []).append(vector)
    ks = {vocab["bank"]: 3, vocab["bat"]: 2, vocab["river"]: 1}
    token_ids = sorted(ks)
    centroids = [kmeans(np.stack(states[t]), ks[t]) for t in token_ids]
    offsets = np.concatenate([[0], np.cumsum([ks[t] for t in token_ids])])
    # "${x$" would be mathtext to matplotlib, and a broken one: the figure must escape it.
    examples = {vocab["bank"]: [["pay ${x$ at the [[bank]]"], [], ["the [[bank]] of the river"]]}
    dictionary = SenseDictionary(token_ids, offsets, np.concatenate(centroids).astype(np.float32),
                                 np.arange(1, offsets[-1] + 1), examples=examples)
    return SenseEncoder(model, tokenizer, dictionary, forward, similarity="l2", device="cpu")


@pytest.fixture(scope="module")
def occurrences(encoder):
    return word_occurrences(encoder, TEXTS, ["bat", "river", "cave", "bank", "zebra"], batch_size=16)


def test_word_occurrences_takes_each_words_token_and_its_snapped_senses(encoder, occurrences):
    vocab = encoder.tokenizer.get_vocab()
    # river has 1 sense, cave no entry, zebra no occurrence: left out; the order of `words` is kept.
    assert list(occurrences) == ["bat", "bank"]
    bank = occurrences["bank"]
    assert bank["token_id"] == vocab["bank"] and bank["token"] == "bank"
    lowercase = [t for t in TEXTS if re.search(r"\bbank\b", t)]
    assert len(lowercase) >= 10 and "BANK robbers ran to the river" not in lowercase
    n = len(lowercase)
    assert bank["vectors"].shape == (n, 32) and bank["vectors"].dtype == np.float32
    assert bank["sense_ids"].shape == (n,) and len(bank["contexts"]) == n
    np.testing.assert_array_equal(bank["centres"], encoder.dictionary.senses(vocab["bank"]))
    np.testing.assert_array_equal(bank["counts"], encoder.dictionary.sense_counts(vocab["bank"]))
    # The sense ids are the dictionary's nearest senses of exactly these vectors, and more than one is used.
    tokens = np.full(n, vocab["bank"])
    np.testing.assert_array_equal(bank["sense_ids"], encoder.dictionary.nearest(tokens, bank["vectors"], "l2"))
    assert len(set(bank["sense_ids"].tolist())) >= 2
    # Each vector is the state of the text's first "bank" (word-level tokens: position = word index + [CLS]).
    for text, vector in list(zip(lowercase, bank["vectors"]))[:5]:
        position = text.split().index("bank") + 1
        np.testing.assert_allclose(vector, encoder.encode([text])[0].hidden[position], atol=1e-5)
    for context in bank["contexts"]:
        assert "[[bank]]" in context and len(context) <= 110 and "\n" not in context


def test_word_occurrences_caps_and_skips_rare_words(encoder):
    capped = word_occurrences(encoder, TEXTS, ["bank"], max_per_word=7)
    assert len(capped["bank"]["sense_ids"]) == 7
    few = [t for t in TEXTS if re.search(r"\bbank\b", t)][: sense_figures.MIN_OCCURRENCES - 1]
    assert word_occurrences(encoder, few, ["bank"]) == {}
    with pytest.raises(ValueError, match="max_per_word=0"):
        word_occurrences(encoder, TEXTS, ["bank"], max_per_word=0)


def test_plot_senses_writes_a_png(occurrences, tmp_path):
    out = tmp_path / "figs" / "senses.png"
    assert plot_senses(occurrences, out) == out
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR
    assert width > 2 * height * 0.9  # two panels side by side
    assert sorted(p.name for p in out.parent.iterdir()) == ["senses.png"]  # no temporary left behind
    one = plot_senses(occurrences, tmp_path / "one.png", max_words=1)
    assert int.from_bytes(one.read_bytes()[16:20], "big") < width


def test_plot_senses_writes_nothing_without_input_or_matplotlib(occurrences, tmp_path, monkeypatch):
    assert plot_senses({}, tmp_path / "empty.png") is None
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)
    assert plot_senses(occurrences, tmp_path / "none.png") is None
    assert list(tmp_path.iterdir()) == []


def test_plot_senses_failing_midway_keeps_the_old_file(occurrences, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    out = tmp_path / "senses.png"
    out.write_bytes(b"old")

    def broken(self, target, **kwargs):
        target.write(PNG_MAGIC + b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_senses(occurrences, out)
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["senses.png"]


def read_tsv(path):
    return [line.split("\t") for line in path.read_text().splitlines()]


def projector_dictionary():
    """5 tokens, 11 senses, d=4; totals of counts: 10 -> 30, 11 -> 5, 12 -> 40, 13 -> 30, 14 -> 1."""
    ks, counts = [2, 1, 3, 4, 1], [20, 10, 5, 20, 10, 10, 10, 10, 5, 5, 1]
    centroids = np.arange(11 * 4, dtype=np.float32).reshape(11, 4) / 8
    examples = {12: [["the\tcoach [[bat]]\nhit"], [], ["x" * 300]]}
    return SenseDictionary([10, 11, 12, 13, 14], np.concatenate([[0], np.cumsum(ks)]), centroids, counts,
                           examples=examples)


class NumberTokenizer:
    def convert_ids_to_tokens(self, token):
        return f"tok{token}"


def test_export_projector_writes_every_sense(tmp_path):
    dictionary = projector_dictionary()
    log_dir = tmp_path / "tb" / "senses"
    assert export_projector(dictionary, NumberTokenizer(), log_dir) == log_dir
    assert "metadata.tsv" in (log_dir / "projector_config.pbtxt").read_text()
    meta = read_tsv(log_dir / "00000" / "senses" / "metadata.tsv")
    assert meta[0] == ["token", "token_id", "sense", "count", "example"] and len(meta) == 1 + 11
    assert all(len(row) == 5 for row in meta)  # tabs in examples did not add columns
    rows = meta[1:]
    # Most vectors first (12: 40, then 10 and 13 with 30 each by id, 11: 5, 14: 1), all senses of each.
    assert [(int(r[1]), int(r[2])) for r in rows] == [(12, 0), (12, 1), (12, 2), (10, 0), (10, 1),
                                                      (13, 0), (13, 1), (13, 2), (13, 3), (11, 0), (14, 0)]
    assert rows[0][0] == "tok12" and rows[0][4] == "the coach [[bat]] hit" and rows[1][4] == "-"
    assert len(rows[2][4]) <= 120 and rows[2][4].startswith("xxx")
    by_row = {(int(r[1]), int(r[2])): int(r[3]) for r in rows}
    for token in dictionary.token_ids:
        for sense, count in enumerate(dictionary.sense_counts(token)):
            assert by_row[(int(token), sense)] == count
    tensors = np.array(read_tsv(log_dir / "00000" / "senses" / "tensors.tsv"), dtype=np.float32)
    assert tensors.shape == (11, 4)
    np.testing.assert_allclose(tensors, np.concatenate([dictionary.senses(int(r[1]))[int(r[2])][None] for r in rows]))


def test_export_projector_keeps_the_most_frequent_tokens_when_capped(tmp_path):
    dictionary = projector_dictionary()
    log_dir = tmp_path / "senses"
    export_projector(dictionary, NumberTokenizer(), log_dir, max_senses=9)  # 12 (3) + 10 (2) + 13 (4)
    meta = read_tsv(log_dir / "00000" / "senses" / "metadata.tsv")
    assert len(meta) == 1 + 9 and {int(r[1]) for r in meta[1:]} == {12, 10, 13}
    assert len(read_tsv(log_dir / "00000" / "senses" / "tensors.tsv")) == 9
    export_projector(dictionary, NumberTokenizer(), log_dir, max_senses=8)  # a rerun replaces: 13 no longer fits
    assert {int(r[1]) for r in read_tsv(log_dir / "00000" / "senses" / "metadata.tsv")[1:]} == {12, 10}
    with pytest.raises(ValueError, match="max_senses=2"):
        export_projector(dictionary, NumberTokenizer(), log_dir, max_senses=2)
