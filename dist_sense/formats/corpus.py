"""The corpus: documents read through `datasets`, cut into token windows for the teacher.

`load_documents` turns a file, a directory of files or a `save_to_disk` directory into
a Dataset with one "text" column. Ranks split it by stride (`rank_documents`), so every
rank computes the same assignment from the document count alone. `iter_windows` cuts
each document into windows that fit the model with its special tokens; windows may
overlap, but every document token is *owned* by exactly one window, so counts and
kept hidden states never see a token twice and nothing is silently truncated.
"""
from __future__ import annotations

import codecs
import itertools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np


class CorpusError(ValueError):
    """A corpus path, field or value that cannot be used; the message names it and what to do."""


# File suffix -> the `datasets` builder that reads it.
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
TOKENIZE_BATCH = 64
"""Documents per tokenizer call: one call per batch lets the fast tokenizer work in parallel."""
READ_BATCH = 1024
"""Documents read from the dataset at once in `documents_for_rank`."""
COUNT_FLUSH = 1 << 20
"""Owned ids gathered before one `np.bincount`, so a large vocabulary is not summed per window."""


# ----------------------------------------------------------------------------- reading documents

def load_documents(path: str, text_field: str = "text", max_documents: int = 0) -> "datasets.Dataset":
    """The corpus at `path` as a Dataset with one "text" column (other columns are dropped).

    `path` is a .txt file (each non-blank line is a document), a .jsonl/.json, .csv or
    .parquet file, a directory of such files (one format, read in name order), or a
    `save_to_disk` directory (a DatasetDict gives its "train" split, or its only one).
    A corpus with no documents, a non-string document, or only blank documents is refused.
    """
    root = Path(path)
    if not str(path) or not root.exists():
        raise CorpusError(f"corpus path {str(path)!r} does not exist: set corpus.path to a data file or directory")
    if root.is_dir() and _is_saved_dataset(root):
        dataset = _load_saved(root)
    else:
        files, builder = _data_files(root)
        dataset = _load_files(root, files, builder)
        if builder == "text":
            # The text builder keeps blank lines as empty rows; they are not documents.
            text_field = "text"
            dataset = dataset.filter(lambda texts: [bool(t.strip()) for t in texts], input_columns="text",
                                     batched=True, keep_in_memory=True)
    dataset = _only_text_column(dataset, text_field, root)
    if max_documents > 0 and len(dataset) > max_documents:
        dataset = dataset.select(range(max_documents))
    if len(dataset) == 0:
        raise CorpusError(f"{root}: no documents found: the corpus is empty")
    _check_all_strings(dataset, text_field, root)
    _check_some_text(dataset, text_field, root, max_documents)
    return dataset


def _is_saved_dataset(root: Path) -> bool:
    return (root / "dataset_dict.json").is_file() or (root / "state.json").is_file()


def _load_saved(root: Path):
    import datasets

    try:
        loaded = datasets.load_from_disk(str(root))
    except Exception as err:
        raise CorpusError(f"{root}: looks like a save_to_disk directory but cannot be loaded: {err}") from err
    if isinstance(loaded, datasets.DatasetDict):
        if "train" in loaded:
            return loaded["train"]
        if len(loaded) == 1:
            return next(iter(loaded.values()))
        raise CorpusError(f"{root}: DatasetDict with splits {sorted(loaded)} and no 'train': "
                          f"save the split to use on its own")
    return loaded


def _data_files(root: Path) -> tuple[list[Path], str]:
    """The non-empty data files at `root` and the one builder that reads them all."""
    if root.is_file():
        if root.suffix.lower() not in BUILDERS:
            raise CorpusError(f"{root}: unsupported file type {root.suffix!r}: use one of {sorted(BUILDERS)}")
        candidates = [root]
    else:
        found = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
        candidates = [p for p in found if p.suffix.lower() in BUILDERS]
        if not candidates:
            names = [p.name for p in found[:10]]
            raise CorpusError(f"{root}: directory holds no data files ({sorted(BUILDERS)}) and is not a "
                              f"save_to_disk directory; found {names}")
    builders = {BUILDERS[p.suffix.lower()] for p in candidates}
    if len(builders) > 1:
        suffixes = sorted({p.suffix for p in candidates})
        raise CorpusError(f"{root}: mixes file types {suffixes}: keep one format per corpus directory")
    # An empty file holds no documents, and some builders fail on one with no useful message.
    files = [p for p in candidates if p.stat().st_size > 0]
    if not files:
        raise CorpusError(f"{root}: is empty (no documents)" if root.is_file() else f"{root}: all data files are empty")
    return files, builders.pop()


def _load_files(root: Path, files: list[Path], builder: str):
    import datasets

    if builder != "parquet":
        # The json reader would store bad bytes unchecked, to fail later in whoever reads the row.
        for file in files:
            _check_utf8(file)
    # A throwaway cache: keep_in_memory holds the table in RAM, so nothing lands in ~/.cache.
    with tempfile.TemporaryDirectory(prefix="dist_sense_corpus_") as cache:
        try:
            return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                         cache_dir=cache, keep_in_memory=True)
        except Exception as err:
            cause = err.__cause__ or err
            raise CorpusError(f"{root}: cannot be read as {builder}: {type(cause).__name__}: {cause}") from err


def _check_utf8(file: Path, block: int = 1 << 23) -> None:
    """Fail on the first byte that is not UTF-8, naming its offset, rather than guess a replacement."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(file, "rb") as f:
        while True:
            data = f.read(block)
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as err:
                # err.start counts from the bytes the decoder still held back plus this block.
                held = len(err.object) - len(data)
                at = offset - held + err.start
                raise CorpusError(f"{file}: not valid UTF-8 at byte offset {at} ({err.reason}): "
                                  f"re-encode the file as UTF-8") from None
            if not data:
                return
            offset += len(data)


def _only_text_column(dataset, text_field: str, root: Path):
    if text_field not in dataset.column_names:
        raise CorpusError(f"{root}: no text field {text_field!r}; columns are {dataset.column_names}: "
                          f"set corpus.text_field to the one holding the text")
    dataset = dataset.select_columns([text_field])
    return dataset.rename_column(text_field, "text") if text_field != "text" else dataset


def _check_all_strings(dataset, text_field: str, root: Path) -> None:
    """Every document must be a string: a null or a number would otherwise fail deep in tokenisation."""
    is_string = getattr(dataset.features["text"], "dtype", None) in ("string", "large_string")
    begin = 0
    for batch in dataset.with_format("arrow" if is_string else None).iter(batch_size=1 << 16):
        # A string column can only hold nulls, which arrow counts for free; anything else
        # (numbers, lists, mixed JSON) is looked at value by value.
        if is_string and batch.column(0).null_count == 0:
            begin += batch.num_rows
            continue
        values = batch.column(0).to_pylist() if is_string else batch["text"]
        bad = next((i for i, value in enumerate(values) if not isinstance(value, str)), None)
        if bad is not None:
            value = values[bad]
            raise CorpusError(f"{root}: field {text_field!r} in row {begin + bad} is {type(value).__name__} "
                              f"{str(value)[:60]!r}, not text: every document must be a string")
        begin += len(values)


def _check_some_text(dataset, text_field: str, root: Path, max_documents: int) -> None:
    """Some document must hold more than whitespace: else every stage runs on nothing, to fail far later."""
    for batch in dataset.with_format(None).iter(batch_size=READ_BATCH):
        if any(text.strip() for text in batch["text"]):
            return
    cut = f" (only the first max_documents={max_documents} are read)" if len(dataset) == max_documents else ""
    raise CorpusError(f"{root}: field {text_field!r} is blank or whitespace in all {len(dataset)} documents{cut}: "
                      f"the corpus has no text to work on")


# ----------------------------------------------------------------------------- ranks

def rank_documents(n_documents: int, rank: int, world_size: int) -> range:
    """Documents rank, rank + world, ...: near-equal shares from the count alone (a rank may get none)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise CorpusError(f"rank {rank} is not within world_size {world_size}")
    return range(rank, max(n_documents, 0), world_size)


def documents_for_rank(dataset, rank: int, world_size: int) -> Iterator[tuple[int, str]]:
    """(global document index, text) of this rank's documents, in order, read in batches."""
    indices = rank_documents(len(dataset), rank, world_size)
    if not indices:
        return
    # keep_in_memory: a strided select builds an index mapping, which must not be written to disk.
    mine = dataset.with_format(None).select(indices, keep_in_memory=True)
    for begin in range(0, len(mine), READ_BATCH):
        texts = mine[begin:begin + READ_BATCH]["text"]
        for offset, text in enumerate(texts):
            yield indices[begin + offset], text


# ----------------------------------------------------------------------------- windows

@dataclass
class Window:
    doc: int
    """Global document index."""
    index: int
    """Window number within the document (0, 1, ...)."""
    start: int
    """Offset, in document tokens (no specials), of the window's first token."""
    input_ids: list[int]
    """The window's ids with the tokenizer's special tokens."""
    special: list[bool]
    """Per id: True for the special tokens the tokenizer added, and for model.instruction's tokens."""
    owned: list[bool]
    """Per id: True where this window is the first to hold that document token (specials never)."""
    doc_pos: list[int]
    """Per id: position in the document's token sequence, -1 for specials."""
    spans: list[tuple[int, int]]
    """Per id: character span in `text`, (0, 0) for specials."""
    text: str
    """The document text from the first token's start to the last token's end."""


def special_layout(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after one sequence, found by encoding a probe both ways.

    transformers 5 fast tokenizers have no `build_inputs_with_special_tokens`, and a mask by
    `all_special_ids` would also flag a literal "[SEP]" typed in a document; the probe gives
    the added positions exactly, for slow and fast tokenizers alike.
    """
    probe = "hello world"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    expected = tokenizer.num_special_tokens_to_add(pair=False)
    if plain and len(full) - len(plain) == expected:
        for at in range(expected + 1):
            if full[at:at + len(plain)] == plain:
                return list(full[:at]), list(full[at + len(plain):])
    raise CorpusError(f"tokenizer {type(tokenizer).__name__}: cannot tell its special tokens apart "
                      f"({full} around {plain}, {expected} expected)")


def instruction_ids(tokenizer, instruction: str) -> list[int]:
    """The ids of model.instruction, as they follow the tokenizer's leading specials ([] for none)."""
    return list(tokenizer(instruction, add_special_tokens=False)["input_ids"]) if instruction else []


def iter_windows(texts: Iterable[tuple[int, str]], tokenizer, max_length: int, stride: int = 0,
                 instruction: str = "") -> Iterator[Window]:
    """Windows of at most `max_length` ids (specials included) over each (doc, text); none for empty text.

    With an `instruction` (model.instruction), its ids follow the leading specials in every
    window and are marked special like them: never sampled, labelled or pooled."""
    if not getattr(tokenizer, "is_fast", False):
        raise CorpusError(f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer: windows need its offsets")
    prefix, suffix = special_layout(tokenizer)
    prompt = instruction_ids(tokenizer, instruction)
    prefix = prefix + prompt
    body = max_length - len(prefix) - len(suffix)
    if stride < 0 or body <= stride:
        told = f" and the {len(prompt)} tokens of model.instruction={instruction!r}" if prompt else ""
        raise CorpusError(f"corpus.max_length={max_length} leaves {body} tokens per window after "
                          f"{len(prefix) + len(suffix) - len(prompt)} special tokens{told}, which must exceed "
                          f"corpus.stride={stride}: raise corpus.max_length" + (" or shorten the instruction" if prompt else ""))
    documents = iter(texts)
    while chunk := list(itertools.islice(documents, TOKENIZE_BATCH)):
        encoded = tokenizer([text for _, text in chunk], add_special_tokens=False,
                            return_offsets_mapping=True, verbose=False)
        for (doc, text), ids, offsets in zip(chunk, encoded["input_ids"], encoded["offset_mapping"]):
            yield from _cut_document(doc, text, ids, offsets, prefix, suffix, body, stride)


def _cut_document(doc, text, ids, offsets, prefix, suffix, body, stride) -> Iterator[Window]:
    start, owned_from, index = 0, 0, 0
    while start < len(ids):
        end = min(start + body, len(ids))
        yield _make_window(doc, index, text, ids, offsets, start, end, owned_from, prefix, suffix)
        if end == len(ids):
            return
        # The next window repeats the last `stride` tokens as context; only what follows is new.
        start, owned_from, index = start + body - stride, end, index + 1


def _make_window(doc, index, text, ids, offsets, start, end, owned_from, prefix, suffix) -> Window:
    first_char, last_char = offsets[start][0], offsets[end - 1][1]
    positions = range(start, end)
    before, after = len(prefix), len(suffix)
    return Window(
        doc=doc,
        index=index,
        start=start,
        input_ids=list(prefix) + list(ids[start:end]) + list(suffix),
        special=[True] * before + [False] * len(positions) + [True] * after,
        owned=[False] * before + [p >= owned_from for p in positions] + [False] * after,
        doc_pos=[-1] * before + list(positions) + [-1] * after,
        spans=[(0, 0)] * before + [(s - first_char, e - first_char) for s, e in offsets[start:end]] + [(0, 0)] * after,
        text=text[first_char:last_char],
    )


def count_tokens(windows: Iterable[Window], vocab_size: int) -> np.ndarray:
    """int64 [vocab_size] counts of owned tokens: overlap never double-counts, specials never count."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    pending: list[np.ndarray] = []
    gathered = 0
    for window in windows:
        owned_ids = np.asarray(window.input_ids, dtype=np.int64)[np.asarray(window.owned, dtype=bool)]
        pending.append(owned_ids)
        gathered += len(owned_ids)
        if gathered >= COUNT_FLUSH:
            counts += _bincount(pending, vocab_size)
            pending, gathered = [], 0
    return counts + _bincount(pending, vocab_size) if pending else counts


def _bincount(chunks: list[np.ndarray], vocab_size: int) -> np.ndarray:
    ids = np.concatenate(chunks)
    if ids.size and (ids.max() >= vocab_size or ids.min() < 0):
        bad = int(ids.max()) if ids.max() >= vocab_size else int(ids.min())
        raise CorpusError(f"token id {bad} is outside vocab_size={vocab_size}: the tokenizer and model disagree")
    return np.bincount(ids, minlength=vocab_size)


def batch_windows(windows: list[Window], pad_id: int):
    """(input_ids, attention_mask) as LongTensors [batch, longest], right-padded with `pad_id`."""
    import torch

    longest = max((len(w.input_ids) for w in windows), default=0)
    input_ids = torch.full((len(windows), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(windows), longest), dtype=torch.long)
    for row, window in enumerate(windows):
        length = len(window.input_ids)
        input_ids[row, :length] = torch.tensor(window.input_ids, dtype=torch.long)
        attention_mask[row, :length] = 1
    return input_ids, attention_mask


POOL_BATCHES = 8
"""Batches' worth of consecutive windows sorted by length together (see length_sorted_batches)."""


@dataclass
class Batch:
    """Windows forwarded together; `closes_pool` marks the last batch of a length-sorted pool."""

    windows: list
    closes_pool: bool


def length_sorted_batches(windows: Iterable, batch_size: int, pool_batches: int = POOL_BATCHES) -> Iterator[Batch]:
    """Batches of windows of similar length, so little of each forward is spent on padding.

    Each pool of batch_size * pool_batches consecutive windows is sorted longest first
    (a batch that does not fit in memory fails at once) and cut into batches. Pools are
    cut from the stream alone, so a run resumed at a pool boundary forms the same batches.
    """
    for pool in batched(windows, batch_size * pool_batches):
        pool.sort(key=lambda w: -len(w.input_ids))  # stable: ties keep corpus order
        parts = list(batched(pool, batch_size))
        for number, part in enumerate(parts):
            yield Batch(part, number == len(parts) - 1)


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
