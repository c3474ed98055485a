"""Corpus reading (every format, every error) and windowing (coverage, ownership, spans, counts)."""
import json
import random
from collections import Counter

import helpers as testing
import numpy as np
import pytest

from dist_sense.formats import corpus
from dist_sense.formats.corpus import (
    CorpusError,
    Window,
    batch_windows,
    count_tokens,
    documents_for_rank,
    iter_windows,
    load_documents,
    rank_documents,
)

DOCS = testing.toy_sentences(12, seed=3)


@pytest.fixture(scope="module")
def tokenizers():
    return {kind: testing.build_tokenizer(kind) for kind in ("bert", "llama")}


# ----------------------------------------------------------------------------- formats

def _write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def _write(fmt, tmp_path):
    import datasets

    if fmt == "txt":
        path = tmp_path / "docs.txt"
        # Blank and whitespace-only lines are not documents.
        path.write_text(DOCS[0] + "\n\n" + "\n".join(DOCS[1:]) + "\n   \n")
        return path
    if fmt == "jsonl":
        return _write_jsonl(tmp_path / "docs.jsonl", DOCS)
    if fmt == "csv":
        path = tmp_path / "docs.csv"
        datasets.Dataset.from_dict({"text": DOCS}).to_csv(str(path), index=False)
        return path
    if fmt == "parquet":
        path = tmp_path / "docs.parquet"
        datasets.Dataset.from_dict({"text": DOCS}).to_parquet(str(path))
        return path
    if fmt == "jsonl_dir":
        # Names sort b1 < b2 < b3, the order the documents must come back in.
        for name, part in (("b2.jsonl", DOCS[4:8]), ("b1.jsonl", DOCS[:4]), ("b3.jsonl", DOCS[8:])):
            _write_jsonl(tmp_path / name, part)
        (tmp_path / "README.md").write_text("not data")
        return tmp_path
    if fmt == "saved":
        datasets.Dataset.from_dict({"text": DOCS, "n": list(range(len(DOCS)))}).save_to_disk(str(tmp_path / "saved"))
        return tmp_path / "saved"
    if fmt == "saved_dict":
        other = datasets.Dataset.from_dict({"text": ["held out"]})
        splits = datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": DOCS}), validation=other)
        splits.save_to_disk(str(tmp_path / "saved_dict"))
        return tmp_path / "saved_dict"
    raise ValueError(fmt)


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "parquet", "jsonl_dir", "saved", "saved_dict"])
def test_every_format_loads_the_same_documents(fmt, tmp_path):
    dataset = load_documents(str(_write(fmt, tmp_path)))
    assert dataset.column_names == ["text"]
    assert dataset["text"] == DOCS


def test_custom_text_field_and_max_documents(tmp_path):
    path = _write_jsonl(tmp_path / "docs.jsonl", DOCS, field="body")
    dataset = load_documents(str(path), text_field="body", max_documents=5)
    assert dataset.column_names == ["text"]
    assert dataset["text"] == DOCS[:5]


def test_single_split_dataset_dict_is_used(tmp_path):
    import datasets

    datasets.DatasetDict(only=datasets.Dataset.from_dict({"text": DOCS})).save_to_disk(str(tmp_path / "d"))
    assert load_documents(str(tmp_path / "d"))["text"] == DOCS


# ----------------------------------------------------------------------------- errors

def _raises(path, *names, **kwargs) -> str:
    with pytest.raises(CorpusError) as info:
        load_documents(str(path), **kwargs)
    message = str(info.value)
    for name in names:
        assert str(name) in message, message
    return message


def test_missing_path(tmp_path):
    _raises(tmp_path / "nope.jsonl", tmp_path / "nope.jsonl")


def test_empty_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    _raises(tmp_path / "empty.jsonl", tmp_path / "empty.jsonl")


def test_blank_lines_only_is_no_documents(tmp_path):
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    assert "no documents" in _raises(tmp_path / "blank.txt", tmp_path / "blank.txt")


def test_directory_without_data_files(tmp_path):
    (tmp_path / "notes.md").write_text("hello")
    _raises(tmp_path, tmp_path, "notes.md")


def test_directory_mixing_formats(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", DOCS)
    (tmp_path / "b.txt").write_text("bank river\n")
    _raises(tmp_path, tmp_path, ".jsonl", ".txt")


def test_missing_text_field_lists_columns(tmp_path):
    path = _write_jsonl(tmp_path / "docs.jsonl", DOCS, field="body")
    _raises(path, path, "'content'", "body", "id", text_field="content")


def test_undecodable_bytes_name_file_and_offset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"bank river\nthe \xff bat\n")
    _raises(path, path, "byte offset 15")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "docs.xml"
    path.write_text("<doc>bank</doc>")
    _raises(path, path, ".xml")


@pytest.mark.parametrize("lines", [['{"text": "bank"}', '{"text": null}'], ['{"text": "bank"}', '{"text": 5}']])
def test_non_string_text_names_the_row(tmp_path, lines):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    _raises(path, path, "row 1", "'text'")


# ----------------------------------------------------------------------------- ranks

@pytest.mark.parametrize("n_documents,world", [(10, 3), (7, 1), (5, 8), (0, 2)])
def test_rank_documents_partition(n_documents, world):
    shares = [list(rank_documents(n_documents, rank, world)) for rank in range(world)]
    flat = sorted(i for share in shares for i in share)
    assert flat == list(range(n_documents))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert shares == [list(rank_documents(n_documents, rank, world)) for rank in range(world)]


def test_one_document_two_ranks_leaves_rank_one_empty(tmp_path):
    assert list(rank_documents(1, 0, 2)) == [0] and list(rank_documents(1, 1, 2)) == []
    (tmp_path / "one.txt").write_text("bank river\n")
    dataset = load_documents(str(tmp_path / "one.txt"))
    assert list(documents_for_rank(dataset, 1, 2)) == []
    assert list(documents_for_rank(dataset, 0, 2)) == [(0, "bank river")]


def test_rank_documents_rejects_bad_rank():
    with pytest.raises(CorpusError):
        rank_documents(4, 2, 2)


def test_documents_for_rank_reads_the_strided_share(tmp_path):
    dataset = load_documents(str(_write("jsonl", tmp_path)))
    got = list(documents_for_rank(dataset, 1, 3))
    assert got == [(i, DOCS[i]) for i in range(1, len(DOCS), 3)]


# ----------------------------------------------------------------------------- windows

def _long_document(n_words=300, seed=0):
    rng = random.Random(seed)
    words = [w for w in testing.vocabulary() if not w.startswith(("[", "<"))]
    return " ".join(rng.choice(words) for _ in range(n_words))


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("stride", [0, 4])
def test_windows_cover_a_long_document(tokenizers, kind, stride):
    tokenizer, max_length = tokenizers[kind], 16
    text = "  " + _long_document()  # leading spaces: spans must still be window-relative
    words = text.split()
    windows = list(iter_windows([(7, text)], tokenizer, max_length, stride))
    owners = Counter()
    for number, window in enumerate(windows):
        n = len(window.input_ids)
        assert (window.doc, window.index) == (7, number)
        assert n <= max_length
        assert len(window.special) == len(window.owned) == len(window.doc_pos) == len(window.spans) == n
        body = [i for i in range(n) if not window.special[i]]
        specials = [i for i in range(n) if window.special[i]]
        # The tokenizer's specials sit around the body, and are never owned nor placed in the document.
        expected = tokenizer(words[0])["input_ids"]
        assert [window.input_ids[i] for i in specials] == [t for t in expected if t in tokenizer.all_special_ids]
        assert len(specials) == tokenizer.num_special_tokens_to_add(pair=False) > 0
        assert all(not window.owned[i] and window.doc_pos[i] == -1 and window.spans[i] == (0, 0) for i in specials)
        assert [window.doc_pos[i] for i in body] == list(range(window.start, window.start + len(body)))
        for i in body:
            start, end = window.spans[i]
            assert window.text[start:end] == words[window.doc_pos[i]]
            if window.owned[i]:
                owners[window.doc_pos[i]] += 1
        if number > 0 and stride:
            assert window.start == windows[number - 1].start + (max_length - len(specials)) - stride
    assert sorted(owners) == list(range(len(words))) and set(owners.values()) == {1}


def test_short_and_empty_documents(tokenizers):
    tokenizer = tokenizers["bert"]
    windows = list(iter_windows([(0, "bank river"), (1, ""), (2, "spring")], tokenizer, 16, 4))
    assert [(w.doc, w.index) for w in windows] == [(0, 0), (2, 0)]
    assert windows[0].input_ids == tokenizer("bank river")["input_ids"]
    assert windows[0].text == "bank river" and all(windows[0].owned[1:-1])


def test_a_document_that_exactly_fills_windows(tokenizers):
    # 14 body tokens per window: 28 tokens make exactly two windows, no empty third.
    text = " ".join(["bank"] * 28)
    windows = list(iter_windows([(0, text)], tokenizers["bert"], 16))
    assert [w.start for w in windows] == [0, 14]


def test_windows_reject_stride_that_leaves_no_new_tokens(tokenizers):
    with pytest.raises(CorpusError, match="stride"):
        list(iter_windows([(0, "bank")], tokenizers["bert"], 6, 4))


@pytest.mark.parametrize("stride", [0, 3, 9])
def test_count_tokens_equals_a_direct_count(tokenizers, stride):
    tokenizer = tokenizers["llama"]
    docs = [(i, _long_document(n, seed=i)) for i, n in enumerate([0, 1, 15, 40, 130])]
    counts = count_tokens(iter_windows(docs, tokenizer, 12, stride), len(tokenizer))
    direct = np.zeros(len(tokenizer), dtype=np.int64)
    for _, text in docs:
        np.add.at(direct, tokenizer(text, add_special_tokens=False)["input_ids"], 1)
    assert counts.dtype == np.int64 and counts.shape == (len(tokenizer),)
    assert np.array_equal(counts, direct)


def test_count_tokens_rejects_ids_outside_the_vocabulary():
    window = Window(0, 0, 0, [1, 99], [False, False], [True, True], [0, 1], [(0, 1), (2, 3)], "a b")
    with pytest.raises(CorpusError, match="99"):
        count_tokens([window], 50)


def test_batch_windows_right_pads(tokenizers):
    tokenizer = tokenizers["bert"]
    windows = list(iter_windows([(0, "bank river water"), (1, "bat")], tokenizer, 16))
    input_ids, attention_mask = batch_windows(windows, tokenizer.pad_token_id)
    assert input_ids.shape == attention_mask.shape == (2, 5)
    assert input_ids[1].tolist() == windows[1].input_ids + [tokenizer.pad_token_id] * 2
    assert attention_mask.tolist() == [[1] * 5, [1, 1, 1, 0, 0]]


def test_length_sorted_batches_keep_every_window_once_and_cut_pools_from_the_stream():
    def window(doc: int) -> corpus.Window:
        n = 1 + (doc * 7) % 11
        return corpus.Window(doc=doc, index=0, start=0, input_ids=list(range(n)), special=[False] * n, owned=[True] * n,
                             doc_pos=list(range(n)), spans=[(0, 0)] * n, text="")

    windows = [window(i) for i in range(50)]
    batches = list(corpus.length_sorted_batches(windows, batch_size=4, pool_batches=3))
    assert sorted(w.doc for b in batches for w in b.windows) == list(range(50))
    assert [len(b.windows) for b in batches] == [4, 4, 4] * 4 + [2]
    assert [b.closes_pool for b in batches] == [False, False, True] * 4 + [True]
    for pool in range(5):  # each pool is the next 12 windows of the stream, longest first
        members = [w for b in batches[3 * pool : 3 * pool + 3] for w in b.windows]
        assert sorted(w.doc for w in members) == list(range(12 * pool, min(12 * pool + 12, 50)))
        lengths = [len(w.input_ids) for w in members]
        assert lengths == sorted(lengths, reverse=True)
    # A stream resumed after two pools forms the same later batches.
    resumed = list(corpus.length_sorted_batches(windows[24:], batch_size=4, pool_batches=3))
    assert [[w.doc for w in b.windows] for b in resumed] == [[w.doc for w in b.windows] for b in batches[6:]]
