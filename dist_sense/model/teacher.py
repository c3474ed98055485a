"""The teacher under DeepSpeed ZeRO-3: load once, forward in lockstep, read one layer.

Used by the extraction and labelling passes (and evaluation). ZeRO-3 partitions the
parameters across ranks and gathers each layer collectively during the forward, so
every rank must call `forward` the same number of times: `run_lockstep` makes ranks
agree on the number of batches and feeds dummy batches to the ranks that run short.
extract.partition=replicate (and auto on a single rank) loads a whole copy per rank instead.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from dist_sense import comm
from dist_sense.config import ConfigError, ModelConfig
from dist_sense.formats.identity import model_fingerprint
from dist_sense.formats.manifest import tokenizer_fingerprint
from dist_sense.model.loading import (  # noqa: F401 (TeacherError, resolve_model_path: re-exported)
    TORCH_DTYPES,
    TeacherError,
    forward_mask,
    make_bidirectional,
    resolve_model_path,
    teacher_path,
)

# Model types whose learned positions are numbered from pad_token_id + 1 (RoBERTa's family):
# their max_position_embeddings counts the positions below that too.
OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "ibert",
                              "longformer", "luke", "mpnet", "roberta-prelayernorm", "xmod"})


def _text_config(hf_config):
    return hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config


def position_limit(hf_config) -> int | None:
    """The most ids (special tokens included) one input may hold: the learned positions, or the
    trained context of a rotary model (max_position_embeddings either way); None if the config has none."""
    config = _text_config(hf_config)
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int) or positions <= 0:
        return None
    if getattr(config, "model_type", "") in OFFSET_POSITIONS:
        pad = getattr(config, "pad_token_id", None)
        positions -= (1 if pad is None else int(pad)) + 1
    return positions


def tokenizer_ids(tokenizer) -> int:
    """How many ids the tokenizer can produce: one past its highest id, added tokens included."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


def check_fits(hf_config, tokenizer, model_path, tokenizer_path, max_length: int = 0) -> None:
    """Refuse a tokenizer whose ids run past the model's embedding table (a larger, padded table is
    fine) and windows of `max_length` (corpus.max_length; 0: not checked) longer than its positions."""
    rows = getattr(_text_config(hf_config), "vocab_size", None)
    ids = tokenizer_ids(tokenizer)
    if isinstance(rows, int) and ids > rows:
        raise TeacherError(f"tokenizer {tokenizer_path} has {ids} ids (len(tokenizer)={len(tokenizer)}, added tokens "
                           f"included) but model {model_path} embeds only vocab_size={rows}: ids up to {ids - 1} "
                           f"would index past its embedding table; use the model's own tokenizer (model.tokenizer)")
    check_max_length(max_length, hf_config, f"model {model_path}")


def check_max_length(max_length: int, hf_config, what: str, error: type[ConfigError] = ConfigError) -> None:
    """Refuse corpus.max_length beyond the positions of `what` (the model of `hf_config`)."""
    limit = position_limit(hf_config)
    if max_length and limit is not None and max_length > limit:
        raise error(f"corpus.max_length={max_length} is beyond the {limit} positions of {what} "
                    f"(max_position_embeddings): set corpus.max_length to at most {limit}")


def teacher_fingerprint(model_path: Path, tokenizer_path: Path) -> str:
    """Id of the teacher by the content of its files (config, weights, tokenizer), and of a separate tokenizer's."""
    found = model_fingerprint(model_path)
    if tokenizer_path.resolve() != model_path.resolve():
        found = hashlib.sha256(f"{found}:{model_fingerprint(tokenizer_path)}".encode()).hexdigest()[:16]
    return found


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.tokenizer or cfg.teacher)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except Exception as err:
        raise TeacherError(f"tokenizer at {path} does not load: {err}") from None
    if tokenizer.pad_token_id is None:
        # Decoders often ship without a pad token; padding is masked, so any id will do.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def zero3_config(path: str, dtype: str, micro_batch: int, offload: str = "none", nvme_path: str = "") -> dict:
    """The ZeRO-3 inference config from ds_configs/, with dtype, batch and offload filled in."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"extract.ds_config={path}: cannot read DeepSpeed JSON ({err})") from None
    config = copy.deepcopy(config)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") != 3:
        raise ConfigError(f"{path}: zero_optimization.stage must be 3 for the teacher, found {zero.get('stage')}")
    if offload != "none":
        zero["offload_param"] = {"device": offload, "pin_memory": comm.cuda_available()}
        if offload == "nvme":
            zero["offload_param"]["nvme_path"] = nvme_path
    config["bf16"] = {"enabled": dtype == "bf16"}
    config["fp16"] = {"enabled": dtype == "fp16"}
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config.pop("train_batch_size", None)
    config.pop("gradient_accumulation_steps", None)
    return config


def use_zero3(partition: str, world_size: int, offload: str) -> bool:
    """Whether the teacher is partitioned with ZeRO-3 (see extract.partition)."""
    if partition == "auto":
        # One rank holds every parameter anyway: without offload, ZeRO-3 would only add gather hooks.
        return world_size > 1 or offload != "none"
    return partition == "zero3"


class Teacher:
    """A frozen HF model, partitioned with ZeRO-3 or replicated; `hidden(ids, mask)` returns the configured layer."""

    def __init__(self, cfg: ModelConfig, ds_config: str, micro_batch: int, offload: str = "none", nvme_path: str = "",
                 partition: str = "auto", max_length: int = 0):
        """max_length: corpus.max_length, refused when beyond the model's positions (0: not checked)."""
        from transformers import AutoConfig, AutoModel

        self.path = teacher_path(cfg)
        self.tokenizer = load_tokenizer(cfg)
        try:
            hf_config = AutoConfig.from_pretrained(self.path, trust_remote_code=cfg.trust_remote_code)
        except Exception as err:
            raise TeacherError(f"model.teacher={cfg.teacher}: config does not load: {err}") from None
        # Before the weights: every rank refuses at the same point, with nothing loaded in vain.
        check_fits(hf_config, self.tokenizer, self.path, resolve_model_path(cfg.tokenizer or cfg.teacher), max_length)
        self.n_layers = int(getattr(hf_config, "num_hidden_layers", 0))
        self.layer = normalise_layer(cfg.layer, self.n_layers)
        self.d = int(hf_config.hidden_size)
        self.dtype = cfg.dtype
        self.instruction, self.bidirectional = cfg.instruction, cfg.bidirectional
        ds = zero3_config(ds_config, cfg.dtype, micro_batch, offload, nvme_path)
        env = comm.init_torch()
        self.partitioned = use_zero3(partition, env.world_size, offload)
        if self.partitioned:
            from transformers.integrations import HfDeepSpeedConfig

            # Must exist before from_pretrained (so weights load partitioned) and stay alive after.
            self._hf_ds_config = HfDeepSpeedConfig(ds)
        try:
            model = AutoModel.from_pretrained(self.path, dtype=TORCH_DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code)
        except Exception as err:
            raise TeacherError(f"model.teacher={cfg.teacher}: weights do not load: {err}") from None
        model.eval().requires_grad_(False)
        if cfg.bidirectional:
            make_bidirectional(model)
        if self.partitioned:
            import deepspeed

            self._engine = deepspeed.initialize(model=model, config=ds)[0]  # kept: it owns the gather hooks
            self.module, self.device = self._engine.module, self._engine.device
        else:
            self.device = comm.device()
            self.module = model.to(self.device)
        self.module.eval()
        self.fingerprint = teacher_fingerprint(self.path, resolve_model_path(cfg.tokenizer or cfg.teacher))
        self.tokenizer_fingerprint = tokenizer_fingerprint(self.tokenizer)

    @torch.no_grad()
    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L, d] float32 states of the configured layer (the final-norm output for the last)."""
        return layer_states(self.module, input_ids.to(self.device), attention_mask.to(self.device),
                            self.layer, self.n_layers)

    def dummy_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch whose only purpose is to keep this rank in step with the others."""
        ids = torch.full((batch_size, 2), self.tokenizer.pad_token_id, dtype=torch.long)
        return ids, torch.ones_like(ids)


def layer_states(model, input_ids, attention_mask, layer: int, n_layers: int) -> torch.Tensor:
    """[B, L, d] float32 states of `layer` (0..n_layers) of an HF model; the last is its final output."""
    want_all = layer != n_layers
    out = model(input_ids=input_ids, attention_mask=forward_mask(model, attention_mask), output_hidden_states=want_all,
                return_dict=True)
    return (out.hidden_states[layer] if want_all else out.last_hidden_state).float()


def normalise_layer(layer: int, n_layers: int) -> int:
    """Layer index in 0..n_layers (0: embeddings; n_layers: last); negative counts from the end."""
    if not -(n_layers + 1) <= layer <= n_layers:
        raise ConfigError(f"model.layer={layer}: the teacher has {n_layers} layers; use -{n_layers + 1}..{n_layers}")
    return layer % (n_layers + 1)


def run_lockstep(
    teacher: Teacher,
    batches: Iterable,
    to_tensors: Callable[[object], tuple[torch.Tensor, torch.Tensor]],
    batch_size: int,
) -> Iterator[tuple[object, torch.Tensor]]:
    """Yield (batch, hidden) for this rank's batches, keeping every rank's forward count equal.

    Before each forward the ranks agree (one tiny all-reduce) whether any of them still
    has data; a rank that has run out forwards a dummy batch whose output is dropped,
    so ZeRO-3's parameter gathers line up and nobody waits forever. Streaming: no rank
    needs to know its batch count in advance.
    """
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        if comm.all_reduce_max(batch is not None) == 0:
            return
        if batch is None:
            teacher.hidden(*teacher.dummy_batch(batch_size))
            continue
        yield batch, teacher.hidden(*to_tensors(batch))
