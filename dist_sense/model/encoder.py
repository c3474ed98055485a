"""SenseEncoder: the user-facing end of a run. Text in; senses and embeddings out.

    from dist_sense import SenseEncoder
    enc = SenseEncoder.load("runs/demo", model="student")   # or model="teacher"
    out = enc.encode(["the bank of the river"])[0]
    out.sense_ids, out.sense_embeddings, out.sentence_embedding
    enc.senses("bank"); enc.disambiguate("she sat on the bank", "bank")

Snapping (the paper's drop-in replacement) is one gather and one batched matmul per
batch: dot, cos and l2 all reduce to a dot product against a transformed sense table
built once (losses.sense_table: the same transform the distillation loss uses).
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dist_sense.config import RunConfig
from dist_sense.formats.dictionary import SenseDictionary
from dist_sense.model.losses import sense_logits, sense_queries, sense_table


@dataclass
class EncodedText:
    """One text's encoding; arrays are numpy unless encode(..., return_tensors="pt")."""

    token_ids: np.ndarray
    """int64 [n] token ids, special tokens included."""
    tokens: list[str]
    """The n tokens as strings."""
    sense_ids: np.ndarray
    """int64 [n] sense of each token within its token's senses; -1 where the token has none."""
    sense_embeddings: np.ndarray
    """[n, d] each token's sense centre (its continuous state where it has no sense)."""
    hidden: np.ndarray
    """[n, d] continuous states."""
    sentence_embedding: np.ndarray
    """[d] mean of the continuous states over non-special tokens."""
    sentence_sense_embedding: np.ndarray
    """[d] mean of the sense embeddings over non-special tokens."""
    offsets: list[tuple[int, int]]
    """Character span of each token in the text ((0, 0) for specials)."""


class SnapTable:
    """The dictionary's senses on a device, transformed so every similarity is a dot product."""

    def __init__(self, dictionary: SenseDictionary, similarity: str, device):
        if similarity not in ("dot", "cos", "l2"):
            raise ValueError(f"similarity={similarity!r}: use dot, cos or l2")
        centres, mask, token_to_row = (torch.from_numpy(np.ascontiguousarray(a)) for a in dictionary.padded(np))
        self.raw = centres.to(device)
        self.centres, self.mask = sense_table(centres, similarity).to(device), mask.to(device)
        self.token_to_row = token_to_row.to(device)
        self.similarity = similarity

    def snap(self, token_ids: torch.Tensor, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sense ids [N] with -1 where none, sense embeddings [N, d]) for flat ids [N] and states [N, d]."""
        vocab = self.token_to_row.shape[0]
        rows = torch.where((token_ids >= 0) & (token_ids < vocab), self.token_to_row[token_ids.clamp(0, vocab - 1)], -1)
        has = rows >= 0
        sense = torch.full_like(token_ids, -1)
        embedded = states.clone()
        if has.any():
            h = sense_queries(states[has], self.similarity)
            best = sense_logits(h, rows[has], self.centres, self.mask).argmax(dim=-1)
            sense[has] = best
            embedded[has] = self.raw[rows[has], best].to(states.dtype)
        return sense, embedded


def _text_list(texts) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"texts: got one {type(texts).__name__} ({texts[:40]!r}), not a list of texts: "
                        f"pass a list, e.g. encode([text])")
    texts = list(texts)
    bad = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
    if bad is not None:
        raise TypeError(f"texts[{bad}] is {type(texts[bad]).__name__} {str(texts[bad])[:40]!r}, not str: "
                        f"every text must be a string")
    return texts


def _positions(model) -> int | None:
    """The most ids one input may hold in `model` (an HF model or a Student); None if unknown."""
    from dist_sense.model.teacher import position_limit

    config = getattr(model, "config", None) or getattr(getattr(model, "backbone", None), "config", None)
    return position_limit(config) if config is not None else None


class SenseEncoder:
    """A teacher or distilled student plus the run's sense dictionary."""

    def __init__(self, model, tokenizer, dictionary: SenseDictionary, forward, similarity: str = "dot",
                 device=None, max_length: int = 512, instruction: str = ""):
        """instruction: model.instruction, put before every text (after the leading specials); its tokens are
        neither snapped nor pooled."""
        self.model, self.tokenizer, self.dictionary, self._forward = model, tokenizer, dictionary, forward
        self.instruction = instruction
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.table = SnapTable(dictionary, similarity, self.device)
        self.max_length = min(max_length, _positions(model) or max_length)

    def with_model(self, model, forward=None) -> "SenseEncoder":
        """Another model read through this encoder's tokenizer, dictionary and snapping table (shared, not
        rebuilt); forward defaults to the model itself (a student)."""
        other = copy.copy(self)
        other.model, other._forward = model, forward or model
        other.max_length = min(self.max_length, _positions(model) or self.max_length)
        return other

    @classmethod
    def load(cls, run_dir, model: str = "student", similarity: str | None = None, device=None,
             student_dir: str | None = None) -> "SenseEncoder":
        """Open RUN (its config.json and dictionary/) with the teacher or the student (RUN/student/final)."""
        from dist_sense.model.loading import frozen_teacher
        from dist_sense.model.student import check_dictionary, load_student
        from dist_sense.model.teacher import layer_states, load_tokenizer, normalise_layer

        run_dir = Path(run_dir)
        cfg = RunConfig.load(run_dir / "config.json")
        dictionary = SenseDictionary.load(run_dir / "dictionary")
        tokenizer = load_tokenizer(cfg.model)
        dictionary.check_tokenizer(tokenizer)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if model == "teacher":
            net = frozen_teacher(cfg.model, device)
            n_layers = int(net.config.num_hidden_layers)
            layer = normalise_layer(cfg.model.layer, n_layers)

            def forward(ids, mask):
                return layer_states(net, ids, mask, layer, n_layers)
        elif model == "student":
            path = Path(student_dir) if student_dir else run_dir / "student" / "final"
            net = load_student(path, device)
            check_dictionary(net, path, run_dir / "dictionary")
            forward = net
        else:
            raise ValueError(f"model={model!r}: use 'student' or 'teacher'")
        return cls(net, tokenizer, dictionary, forward, similarity or cfg.eval.similarity, device,
                   max_length=min(int(tokenizer.model_max_length or 512), 512), instruction=cfg.model.instruction)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 32, return_tensors: str = "np") -> list[EncodedText]:
        """Encode `texts` in batches; one EncodedText per text, in order (longer texts are cut at max_length).

        `texts` is a list (or any iterable) of strings; a single string is a TypeError rather
        than a batch of its characters: pass [text]. An item that is not a string is a
        TypeError naming its index. Batches are formed from texts of similar length (longest
        first), so little of each forward is spent on padding; results come back in the order of `texts`.
        """
        texts = _text_list(texts)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out: list[EncodedText | None] = [None] * len(texts)
        for start in range(0, len(order), batch_size):
            part = order[start : start + batch_size]
            for i, encoded in zip(part, self._encode_batch([texts[i] for i in part], return_tensors)):
                out[i] = encoded
        return out

    def _encode_batch(self, texts: list[str], return_tensors: str) -> list[EncodedText]:
        # Right padding: row i's first n entries are text i (and decoders keep their positions).
        enc = self._tokenise(texts)
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        states = self._forward(ids, mask).float()
        valid = mask.bool()
        snapped = valid & ~enc["instruction_mask"].to(self.device)
        sense, embedded = self.table.snap(ids[snapped], states[snapped])
        sense_grid = torch.full_like(ids, -1)
        sense_grid[snapped] = sense
        emb_grid = states.clone() * valid[..., None]
        emb_grid[snapped] = embedded
        content = (valid & ~enc["special_tokens_mask"].to(self.device).bool()).float()
        denom = content.sum(1, keepdim=True).clamp_min(1)
        pooled = (states * content[..., None]).sum(1) / denom
        pooled_senses = (emb_grid * content[..., None]).sum(1) / denom
        convert = (lambda t: t.cpu()) if return_tensors == "pt" else (lambda t: t.cpu().numpy())
        results = []
        for i in range(len(texts)):
            n = int(valid[i].sum())
            token_ids = ids[i, :n]
            results.append(EncodedText(
                token_ids=convert(token_ids), tokens=self.tokenizer.convert_ids_to_tokens(token_ids.tolist()),
                sense_ids=convert(sense_grid[i, :n]), sense_embeddings=convert(emb_grid[i, :n]),
                hidden=convert(states[i, :n]), sentence_embedding=convert(pooled[i]),
                sentence_sense_embedding=convert(pooled_senses[i]),
                offsets=[tuple(o) for o in enc["offset_mapping"][i, :n].tolist()],
            ))
        return results

    def _tokenise(self, texts: list[str]) -> dict:
        """The tokenizer's batch (right-padded, cut at max_length, offsets, special marks) with `instruction_mask`;
        with an instruction, its ids follow the leading specials and count as special (never pooled)."""
        if not self.instruction:
            enc = self.tokenizer(texts, padding=True, padding_side="right", truncation=True, max_length=self.max_length,
                                 return_offsets_mapping=True, return_special_tokens_mask=True, return_tensors="pt")
            enc["instruction_mask"] = torch.zeros_like(enc["input_ids"], dtype=torch.bool)
            return enc
        prefix, prompt, suffix = self._instruction_layout()
        room = self.max_length - len(prefix) - len(prompt) - len(suffix)
        if room < 1:
            raise ValueError(f"model.instruction={self.instruction!r} ({len(prompt)} tokens) leaves no room for text "
                             f"within max_length={self.max_length}")
        plain = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        rows = [(list(prefix) + list(prompt) + ids[:room] + list(suffix), offsets[:room])
                for ids, offsets in zip(plain["input_ids"], plain["offset_mapping"])]
        longest = max(len(r) for r, _ in rows)
        head = len(prefix) + len(prompt)
        out = {key: torch.zeros((len(rows), longest), dtype=torch.long)
               for key in ("input_ids", "attention_mask", "special_tokens_mask")}
        out["input_ids"].fill_(self.tokenizer.pad_token_id)
        out["offset_mapping"] = torch.zeros((len(rows), longest, 2), dtype=torch.long)
        out["instruction_mask"] = torch.zeros((len(rows), longest), dtype=torch.bool)
        for i, (row, offsets) in enumerate(rows):
            out["input_ids"][i, :len(row)] = torch.tensor(row)
            out["attention_mask"][i, :len(row)] = 1
            out["special_tokens_mask"][i, :head] = 1
            out["special_tokens_mask"][i, len(row) - len(suffix):len(row)] = 1
            out["instruction_mask"][i, len(prefix):head] = True
            if offsets:
                out["offset_mapping"][i, head:head + len(offsets)] = torch.tensor(offsets)
        return out

    def _instruction_layout(self) -> tuple[list[int], list[int], list[int]]:
        """(leading specials, the instruction's ids, trailing specials), worked out once per encoder."""
        if getattr(self, "_layout", None) is None:
            from dist_sense.formats.corpus import instruction_ids, special_layout

            prefix, suffix = special_layout(self.tokenizer)
            self._layout = (prefix, instruction_ids(self.tokenizer, self.instruction), suffix)
        return self._layout

    def word_tokens(self, word: str) -> list[int]:
        """The token ids of `word` on its own, trying the leading-space form BPE vocabularies use."""
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        spaced = self.tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        return spaced if len(spaced) < len(ids) else ids

    def senses(self, word: str) -> list[dict]:
        """Per token of `word`: its senses with their counts and example contexts."""
        listing = []
        for token in self.word_tokens(word):
            entry = {"token": self.tokenizer.convert_ids_to_tokens(token), "token_id": token, "senses": []}
            if token in self.dictionary:
                counts, examples = self.dictionary.sense_counts(token), self.dictionary.examples(token)
                entry["senses"] = [{"sense": i, "count": int(c), "examples": examples[i] if i < len(examples) else []}
                                   for i, c in enumerate(counts)]
            listing.append(entry)
        return listing

    def disambiguate(self, text: str, word: str) -> dict:
        """The sense of the first occurrence of `word` in `text`, with examples of that sense."""
        found = re.search(rf"\b{re.escape(word)}\b", text, flags=re.IGNORECASE)
        if not found:
            raise ValueError(f"word {word!r} does not occur in the text {text[:80]!r}")
        encoded = self.encode([text])[0]
        for i, (a, b) in enumerate(encoded.offsets):
            if b > a and a < found.end() and b > found.start():  # first token overlapping the word
                token, sense = int(encoded.token_ids[i]), int(encoded.sense_ids[i])
                examples = self.dictionary.examples(token) if token in self.dictionary else []
                return {"word": word, "token": encoded.tokens[i], "token_id": token, "position": i, "sense": sense,
                        "examples": examples[sense] if 0 <= sense < len(examples) else []}
        raise ValueError(f"word {word!r} was cut off: it lies beyond max_length={self.max_length} tokens")
