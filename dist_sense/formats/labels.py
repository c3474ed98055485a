"""Reading RUN/labels/: the manifest checks, the held-out split, and rank-aligned micro-batches.

A labels sample (one window, key f"{doc:010d}_{window:05d}") holds
  input_ids.npy int32 [L], senses.npy int16 [L] (-1: no target),
  soft_ids.npy int16 [L, k] + soft_probs.npy float16 [L, k]   (label.soft_topk > 0),
  teacher.npy float16 [L, d]                                  (label.store_hidden).
Order: each epoch permutes the shards and the samples inside each shard by (seed, epoch);
the epoch's training samples form one flat list, cut to whole optimizer steps, and
micro-batch m of rank r is list[(m * world + r) * micro : ... + micro]. Every rank thus runs
the same number of micro-batches (ZeRO-2 all-reduces gradients at every step; unequal counts
would hang), and one global step covers the same windows whatever the world size.
The held-out split is a hash of the sample key, so it never depends on order or ranks.
Reads seek straight to the members wanted; each one read is checked against the crc32
its sample's checksum member (shards.CHECKSUM_EXT) recorded, which shard_index reads.
"""
from __future__ import annotations

import hashlib
import io
import mmap
from pathlib import Path

import numpy as np
import torch

from dist_sense.formats import shards
from dist_sense.formats.batching import length_groups
from dist_sense.formats.manifest import ManifestError, file_fingerprint, read_manifest
from dist_sense.formats.shards import ShardError

LABELS_FORMAT = "dist_sense.labels"
LABELS_VERSION = 1
FIELDS = ("input_ids", "senses", "soft_ids", "soft_probs", "teacher")


class LabelsError(ManifestError):
    """Labels that do not fit the dictionary or the requested loss; the message names the files."""


def read_labels_manifest(labels_dir) -> dict:
    return read_manifest(labels_dir, LABELS_FORMAT, LABELS_VERSION, stage_hint="label")


def check_labels_match_dictionary(labels_dir, dictionary_dir, manifest: dict, dictionary_meta: dict) -> None:
    """Refuse labels made against another dictionary or tokenizer: their sense ids would mean other senses."""
    labels_file = Path(labels_dir) / "manifest.json"
    index_file = Path(dictionary_dir) / "index.json"
    found = file_fingerprint([index_file])
    if manifest.get("dictionary_fingerprint") != found:
        raise LabelsError(
            f"{labels_file} was made with dictionary fingerprint {manifest.get('dictionary_fingerprint')}, but "
            f"{index_file} has fingerprint {found}: rerun the label stage against this dictionary")
    expected_tok = dictionary_meta.get("tokenizer_fingerprint")
    if expected_tok and manifest.get("tokenizer_fingerprint") != expected_tok:
        raise LabelsError(
            f"{labels_file} has tokenizer fingerprint {manifest.get('tokenizer_fingerprint')}, but {index_file} "
            f"has {expected_tok}: labels and dictionary come from different tokenizers")


def is_held_out(key: str, fraction: float) -> bool:
    """True for about `fraction` of keys, decided by the key alone."""
    if fraction <= 0:
        return False
    draw = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") / 2.0**64
    return draw < fraction


def shard_keys(path: Path, expected: int | None = None) -> list[str]:
    """The sample keys of one tar shard in order, read from member headers only."""
    return list(shard_index(path, expected))


def shard_index(path: Path, expected: int | None = None) -> dict[str, dict[str, tuple[int, int, int | None]]]:
    """{key: {field: (byte offset, size, crc32)}} of one tar shard's .npy members, keys in order,
    from one walk over the headers and checksum members (shards.walk_members): later reads seek
    straight to the data. crc32 is None for a field the checksum member does not list (read_indexed
    refuses it); a sample without a checksum member is refused here."""
    spans: dict[str, dict[str, tuple[int, int]]] = {}
    sums: dict[str, dict[str, int]] = {}
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            for at, name, size in shards.walk_members(path, data):
                key, _, ext = name.partition(".")
                start = at + shards.TAR_BLOCK
                if ext == shards.CHECKSUM_EXT and shards.CHECKSUMS:
                    sums[key] = shards.parse_checksums(path, key, data[start : start + size])
                elif ext.endswith(".npy"):
                    spans.setdefault(key, {})[ext[: -len(".npy")]] = (start, size)
    except (OSError, ValueError) as err:  # ValueError: an empty file cannot be mapped
        raise ShardError(f"{path}: truncated or corrupted labels shard ({err}); {shards.rerun_hint(path)}") from None
    if expected is not None and len(spans) != expected:
        raise ShardError(f"{path}: holds {len(spans)} samples, the manifest says {expected}; {shards.rerun_hint(path)}")
    index = {}
    for key, fields in spans.items():
        if shards.CHECKSUMS and key not in sums:
            shards.parse_checksums(path, key, None)  # raises, naming the sample
        crcs = sums.get(key, {})
        index[key] = {field: (at, size, crcs.get(field + ".npy")) for field, (at, size) in fields.items()}
    return index


def read_indexed(path: Path, index: dict, wanted, skip: tuple[str, ...] = ()) -> dict[str, dict[str, np.ndarray]]:
    """{key: {field: array}} of the `wanted` samples, through a shard_index: only their fields
    (less `skip`) are read, by seeking, each checked against its crc32; nothing else of the tar is parsed."""
    out: dict[str, dict[str, np.ndarray]] = {}
    try:
        with open(path, "rb") as f:
            for key in sorted(wanted, key=lambda k: min(o for o, _, _ in index[k].values())):  # one forward sweep
                fields = {}
                for name, (offset, size, crc) in index[key].items():
                    if name in skip:
                        continue
                    f.seek(offset)
                    data = f.read(size)
                    if shards.CHECKSUMS:
                        shards.check_member(path, key, name + ".npy", data, crc)
                    fields[name] = np.load(io.BytesIO(data), allow_pickle=False)
                out[key] = fields
    except (KeyError, OSError, ValueError) as err:
        raise ShardError(f"{path}: cannot read labels samples ({err}); {shards.rerun_hint(path)}") from None
    for key in wanted:
        if "input_ids" not in out[key] or "senses" not in out[key]:
            raise ShardError(f"{path}: sample {key!r} lacks input_ids/senses; {shards.rerun_hint(path)}")
    return out


def read_samples(path: Path, wanted: set[str]) -> dict[str, dict[str, np.ndarray]]:
    """{key: {field: array}} for the `wanted` keys of one shard (one pass over its headers, then seeks)."""
    return read_indexed(path, shard_index(path), wanted)


def collate(samples: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad a micro-batch to its longest window: ids with pad_id, targets and soft ids with -1."""
    longest = max(len(s["input_ids"]) for s in samples)
    batch = len(samples)
    out = {"input_ids": torch.full((batch, longest), pad_id, dtype=torch.long),
           "attention_mask": torch.zeros((batch, longest), dtype=torch.long),
           "targets": torch.full((batch, longest), -1, dtype=torch.long)}
    first = samples[0]
    if "soft_ids" in first:
        k = first["soft_ids"].shape[1]
        out["soft_ids"] = torch.full((batch, longest, k), -1, dtype=torch.long)
        out["soft_probs"] = torch.zeros((batch, longest, k), dtype=torch.float32)
    if "teacher" in first:
        out["teacher"] = torch.zeros((batch, longest, first["teacher"].shape[1]), dtype=torch.float32)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        out["input_ids"][row, :n] = torch.from_numpy(sample["input_ids"].astype(np.int64))
        out["attention_mask"][row, :n] = 1
        out["targets"][row, :n] = torch.from_numpy(sample["senses"].astype(np.int64))
        for name in ("soft_ids", "soft_probs", "teacher"):
            if name in out:
                out[name][row, :n] = torch.from_numpy(sample[name].astype(out[name].numpy().dtype))
    return out


class LabelData:
    """The train/held-out split of RUN/labels and this rank's micro-batches, with a resumable position."""

    def __init__(self, labels_dir, manifest: dict, rank: int, world_size: int, micro_batch: int,
                 global_batch: int = 0, seed: int = 0, eval_fraction: float = 0.0, pad_id: int = 0,
                 skip_fields: tuple[str, ...] = (), group_steps: int = 0):
        self.dir = Path(labels_dir)
        self.rank, self.world, self.micro = rank, world_size, micro_batch
        self.step_windows = global_batch or world_size * micro_batch
        self.group = group_steps * self.step_windows  # windows per length group (0: none)
        self.seed, self.pad_id, self.skip = seed, pad_id, tuple(skip_fields)
        self.shards = [entry["file"] for entry in manifest.get("shards", [])]
        self.index = [shard_index(self.dir / e["file"], e.get("samples")) for e in manifest.get("shards", [])]
        keys = [list(index) for index in self.index]
        held = [[is_held_out(k, eval_fraction) for k in ks] for ks in keys]
        self.train_keys = [[k for k, h in zip(ks, hs) if not h] for ks, hs in zip(keys, held)]
        self.eval_keys = [(s, k) for s, (ks, hs) in enumerate(zip(keys, held)) for k, h in zip(ks, hs) if h]
        self.n_train = sum(len(ks) for ks in self.train_keys)
        # Epochs hold whole optimizer steps, so where an epoch ends does not depend on the world size.
        per_step = global_batch or world_size * micro_batch
        if per_step % (world_size * micro_batch):
            raise ValueError(f"global batch {per_step} is not a multiple of {world_size} x {micro_batch}")
        self.micro_per_epoch = (self.n_train // per_step) * (per_step // (world_size * micro_batch))
        if self.micro_per_epoch == 0:
            raise LabelsError(f"{self.dir / 'manifest.json'}: {self.n_train} training windows (after holding out "
                              f"{len(self.eval_keys)}) do not fill one step of {per_step} windows: label more "
                              f"text or lower distill.global_batch_size")
        self.epoch, self.micro_done = 0, 0
        self._order: list[tuple[int, str]] | None = None
        self._cache: tuple[int, dict] = (-1, {})
        self._mine: dict[int, set[str]] = {}

    # ------------------------------------------------------------------ position

    def position(self) -> dict:
        """Where the next micro-batch starts: epoch and training windows consumed in it (all ranks)."""
        return {"epoch": self.epoch, "samples": self.micro_done * self.micro * self.world}

    def restore(self, position: dict) -> None:
        per_round = self.micro * self.world
        samples = int(position["samples"])
        if samples % per_round:
            raise LabelsError(f"saved data position {position} is not a whole number of {self.world} x "
                              f"{self.micro} micro-batches: resume with the original world size and batch sizes")
        self.epoch, self.micro_done = int(position["epoch"]), samples // per_round
        self._order, self._cache = None, (-1, {})
        self._roll_epoch()

    # ------------------------------------------------------------------ training batches

    def epoch_order(self, epoch: int) -> list[tuple[int, str]]:
        """(shard, key) of the epoch's training windows, in order, cut to whole optimizer steps.

        Shards in a shuffled order, each shard's windows shuffled. With length groups (group_steps),
        each run of that many steps' windows of one shard is sorted by length (the byte size of its
        input_ids member, read from the index) and cut into blocks of one step, whose order is then
        shuffled: steps pad little, a shard's windows stay contiguous (one read per shard), and the
        order stays a function of (seed, epoch) alone."""
        rng = np.random.default_rng([self.seed, epoch])
        order = []
        for shard in rng.permutation(len(self.shards)):
            keys = [self.train_keys[shard][i] for i in rng.permutation(len(self.train_keys[shard]))]
            if self.group:
                sizes = [self.index[shard][k]["input_ids"][1] for k in keys]
                keys = [keys[i] for i in length_groups(sizes, self.group, self.step_windows, rng)]
            order.extend((int(shard), key) for key in keys)
        return order[: self.micro_per_epoch * self.world * self.micro]

    def _roll_epoch(self) -> None:
        if self.micro_done >= self.micro_per_epoch:
            self.epoch, self.micro_done, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self.epoch_order(self.epoch)
            self._mine = self._rank_keys_by_shard(self._order)
            self._cache = (-1, {})  # it holds the last epoch's picks from its shard

    def _rank_keys_by_shard(self, order: list[tuple[int, str]]) -> dict[int, set[str]]:
        batches = [order[start : start + self.micro] for start in range(self.rank * self.micro, len(order),
                                                                          self.world * self.micro)]
        return keys_by_shard(batches)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's next training micro-batch (epochs roll over by themselves)."""
        self._roll_epoch()
        start = (self.micro_done * self.world + self.rank) * self.micro
        picks = self._order[start : start + self.micro]
        self.micro_done += 1
        return collate([self._sample(shard, key, self._mine) for shard, key in picks], self.pad_id)

    def _sample(self, shard: int, key: str, mine: dict[int, set[str]]) -> dict:
        # A shard's windows are contiguous in the order, so one read per shard brings in
        # everything this rank needs from it (the rest of the tar is skipped, not read).
        if self._cache[0] != shard:
            self._cache = (-1, {})  # free the previous shard first
            self._cache = (shard, read_indexed(self.dir / self.shards[shard], self.index[shard], mine[shard], self.skip))
        return self._cache[1][key]

    # ------------------------------------------------------------------ held-out batches

    def eval_batches(self):
        """This rank's held-out micro-batches (batch b goes to rank b % world; counts may differ)."""
        batches = [self.eval_keys[i : i + self.micro] for i in range(0, len(self.eval_keys), self.micro)]
        mine_batches = batches[self.rank :: self.world]
        mine = keys_by_shard(mine_batches)
        saved_cache, self._cache = self._cache, (-1, {})  # the training stream's shard stays for later
        try:
            for batch in mine_batches:
                yield collate([self._sample(shard, key, mine) for shard, key in batch], self.pad_id)
        finally:
            self._cache = saved_cache


def keys_by_shard(batches) -> dict[int, set[str]]:
    """{shard: keys} over batches of (shard, key) picks."""
    mine: dict[int, set[str]] = {}
    for batch in batches:
        for shard, key in batch:
            mine.setdefault(shard, set()).add(key)
    return mine
