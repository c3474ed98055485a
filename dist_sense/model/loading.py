"""Where the teacher's weights come from, in one place: a folder, a package, a GGUF file, PEFT adapters.

`model.teacher` names a local HF model folder, `pkg:PACKAGE` (an installed package that
ships a model folder or one GGUF file), or a `.gguf` file. A GGUF file is dequantised
once with transformers into a folder under the cache (DIST_SENSE_CACHE, by default
~/.cache/dist_sense), named by the file's content. `model.adapters` are PEFT adapter
folders, applied in order and merged into the weights, once, into another cache folder
named by the base's and the adapters' content. Every stage then loads the same plain
folder (teacher_path): extraction, labelling, the truncated student, evaluation.

A cache folder appears only whole: it is written under a temporary name and renamed,
so a crash leaves nothing that looks complete; ranks that start at once wait on a lock
file while one of them builds it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from dist_sense.config import ConfigError
from dist_sense.formats.identity import file_digest, model_fingerprint

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""model.dtype -> the torch dtype the teacher is loaded and computes in."""
CACHE_ENV = "DIST_SENSE_CACHE"
COMPLETE = ".complete"
"""Written last into a cache folder, before its rename."""


class TeacherError(RuntimeError):
    """A teacher that cannot be loaded or used as configured; the message names it."""


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dist_sense")


def resolve_model_path(spec: str) -> Path:
    """A model folder from a folder, a `.gguf` file (converted once, cached) or `pkg:NAME` shipping either."""
    if not spec:
        raise ConfigError("model.teacher: empty; give a model directory (with config.json), a .gguf file or pkg:PACKAGE")
    source = _package_source(spec) if spec.startswith("pkg:") else Path(spec)
    if source.suffix == ".gguf":
        if not source.is_file():
            raise TeacherError(f"model.teacher={spec!r}: GGUF file {source} not found")
        return gguf_folder(source, spec)
    if not (source / "config.json").is_file():
        raise TeacherError(f"model.teacher={spec!r}: {source / 'config.json'} not found; not a model directory "
                           "(nor a .gguf file)")
    return source


def _package_source(spec: str) -> Path:
    """The model folder (the shallowest config.json) or the one GGUF file inside an installed package."""
    found = importlib.util.find_spec(spec[4:])
    if found is None or not found.submodule_search_locations:
        raise TeacherError(f"model.teacher={spec!r}: package {spec[4:]!r} is not installed")
    root = Path(list(found.submodule_search_locations)[0])
    configs = sorted(root.rglob("config.json"), key=lambda p: len(p.parts))
    if configs:
        return configs[0].parent
    ggufs = sorted(root.rglob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    what = f"{len(ggufs)} .gguf files ({', '.join(p.name for p in ggufs)})" if ggufs else "no config.json nor .gguf file"
    raise TeacherError(f"model.teacher={spec!r}: {what} inside {root}; name the model folder or file itself")


def gguf_folder(gguf: Path, spec: str) -> Path:
    """The dequantised fp32 HF folder of a GGUF file (model and tokenizer), converted on first use."""
    digest = file_digest(gguf)
    out = cache_root() / "gguf" / f"{gguf.stem}-{digest[:16]}"
    if (out / COMPLETE).is_file():
        return out

    def convert(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        except Exception as err:
            raise TeacherError(f"model.teacher={spec!r}: transformers cannot dequantise {gguf} "
                               f"({type(err).__name__}: {err})") from None
        # The GGUF load leaves quantizer state behind; the saved folder is plain fp32 weights.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": digest}, indent=1))

    return _build_once(out, convert)


def teacher_path(model_cfg) -> Path:
    """The folder every stage loads the teacher from: model.teacher resolved, model.adapters merged into it."""
    base = resolve_model_path(model_cfg.teacher)
    adapters = [Path(a) for a in model_cfg.adapters]
    if not adapters:
        return base
    for adapter in adapters:
        if not (adapter / "adapter_config.json").is_file():
            raise TeacherError(f"model.adapters: {adapter / 'adapter_config.json'} not found; not a PEFT adapter folder")
    parts = [model_fingerprint(base)] + [model_fingerprint(a) for a in adapters]
    out = cache_root() / "merged" / hashlib.sha256(":".join(parts).encode()).hexdigest()[:16]
    if (out / COMPLETE).is_file():
        return out

    def merge(tmp: Path) -> None:
        model = merged_model(base, adapters, model_cfg.trust_remote_code)
        model.save_pretrained(tmp)
        for name in os.listdir(base):  # the tokenizer files travel with the weights
            if "token" in name or name.endswith((".model", ".tiktoken")) or name == "vocab.txt":
                shutil.copy2(base / name, tmp / name)
        (tmp / "source.json").write_text(json.dumps({"base": str(base), "adapters": [str(a) for a in adapters]},
                                                    indent=1))

    return _build_once(out, merge)


def merged_model(base: Path, adapters: list[Path], trust_remote_code: bool = False):
    """The base model with each PEFT adapter applied in order and merged into its weights (fp32)."""
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForCausalLM

    first = json.loads((adapters[0] / "adapter_config.json").read_text())
    auto = AutoModelForCausalLM if first.get("task_type") == "CAUSAL_LM" else AutoModel
    model = auto.from_pretrained(base, dtype="float32", trust_remote_code=trust_remote_code)
    for adapter in adapters:
        expected = _adapter_tensor_count(adapter)
        try:
            wrapped = PeftModel.from_pretrained(model, adapter)
        except Exception as err:
            raise TeacherError(f"model.adapters: {adapter} does not fit the base model {base} "
                               f"({type(err).__name__}: {str(err).splitlines()[0][:300]}); was it made for another "
                               "base model?") from None
        loaded = sum(1 for name, _ in wrapped.named_parameters() if "lora_" in name)
        if expected != loaded:
            raise TeacherError(f"model.adapters: {adapter} holds {expected} LoRA tensors but {loaded} found their "
                               f"place in the base model {base}: it was made for another base model (or the same "
                               "model with another head)")
        model = wrapped.merge_and_unload()
    return model


def _adapter_tensor_count(adapter: Path) -> int:
    """LoRA tensors in an adapter's weights file."""
    weights = adapter / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(weights, "pt") as f:
            return sum(1 for key in f.keys() if "lora_" in key)
    state = torch.load(adapter / "adapter_model.bin", map_location="cpu", weights_only=True)
    return sum(1 for key in state if "lora_" in key)


def _build_once(out: Path, build) -> Path:
    """Run build(tmp) into a temporary folder beside `out`, mark it complete and rename it to `out`.

    Ranks that ask at once wait on a lock file while one of them builds (a 134M-parameter GGUF
    takes tens of seconds), then find the folder complete."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / COMPLETE).is_file():
            return out  # built by another rank while this one waited
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            build(tmp)
            (tmp / COMPLETE).write_text("")
            os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


BIDIRECTIONAL = "dist_sense_bidirectional"
"""Set on a model's config (and saved with a student's) when its decoder runs without the causal mask."""


def mark_bidirectional(config) -> None:
    """Mark a model config (a teacher's, or a student's about to be saved) to run without the causal mask."""
    setattr(config, BIDIRECTIONAL, True)


def make_bidirectional(model) -> None:
    """Mark a loaded decoder to run bidirectionally; ConfigError for a model with no causal attention."""
    if not any(getattr(m, "is_causal", False) is True for m in model.modules()):
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ConfigError(f"model.bidirectional=true, but the teacher ({kind}) has no causal attention: it is an "
                          "encoder and already attends both ways; leave model.bidirectional false")
    mark_bidirectional(model.config)


def forward_mask(model, attention_mask):
    """The attention mask to pass `model`: as given, or for a bidirectional decoder a [B, 1, L, L] additive mask
    in which every position sees every non-padding position of its row (transformers takes a 4D mask as is)."""
    if attention_mask is None or not getattr(getattr(model, "config", None), BIDIRECTIONAL, False):
        return attention_mask
    dtype = next(model.parameters()).dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    seen = attention_mask.bool()[:, None, None, :].expand(-1, 1, attention_mask.shape[1], -1)
    mask = torch.zeros(seen.shape, dtype=dtype, device=attention_mask.device)
    return mask.masked_fill(~seen, torch.finfo(dtype).min)


def frozen_teacher(model_cfg, device):
    """The whole teacher on one device for evaluation and SenseEncoder, in model.dtype (as extraction and
    labelling compute it; never an fp32 copy of a bf16 teacher), eval mode, frozen, from teacher_path,
    bidirectional when model.bidirectional."""
    from transformers import AutoModel

    net = AutoModel.from_pretrained(teacher_path(model_cfg), dtype=TORCH_DTYPES[model_cfg.dtype],
                                    trust_remote_code=model_cfg.trust_remote_code)
    if model_cfg.bidirectional:
        make_bidirectional(net)
    return net.to(device).eval().requires_grad_(False)
