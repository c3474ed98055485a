"""Tiny random models, a download-free tokenizer and a toy corpus, for tests and CI.

Models are built from config (hidden 32, 2 layers) and saved with `save_pretrained`,
so every stage runs on them exactly as on a real checkpoint, with no hub access.
The corpus puts ambiguous words ("bank", "bat", "spring", ...) in contexts of
different topics, so a teacher has something to tell apart.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

# Topic -> words; ambiguous words appear under several topics.
TOPICS = {
    "money": "bank loan money interest account cash deposit credit pay rate fund spring".split(),
    "river": "bank river water shore fish boat stream flow mud spring rock".split(),
    "sport": "bat ball game team play score match coach field run pitch".split(),
    "animal": "bat cave night wing fly animal dark sleep hang bird field".split(),
    "season": "spring summer winter flower rain warm grow green season tree run".split(),
}
FILLER = "the a of and to in is was it on with for as at by this that".split()
SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "bos": "<s>", "eos": "</s>", "mask": "[MASK]"}


def vocabulary() -> list[str]:
    words = sorted({w for ws in TOPICS.values() for w in ws} | set(FILLER))
    return list(SPECIALS.values()) + words


def build_tokenizer(kind: str = "bert"):
    """A word-level fast tokenizer; `kind` is bert ([CLS] x [SEP]) or llama (<s> x)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIALS["unk"]))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bert":
        cls, sep = SPECIALS["cls"], SPECIALS["sep"]
        core.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B {sep}", special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])]
        )
        extra = dict(cls_token=cls, sep_token=sep, mask_token=SPECIALS["mask"])
    else:
        bos = SPECIALS["bos"]
        core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
        extra = dict(bos_token=bos, eos_token=SPECIALS["eos"])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=SPECIALS["pad"], unk_token=SPECIALS["unk"], model_max_length=512, **extra
    )


def tiny_config(kind: str, vocab_size: int, hidden: int = 32, layers: int = 2):
    from transformers import BertConfig, LlamaConfig

    if kind == "bert":
        return BertConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
            intermediate_size=hidden * 2, max_position_embeddings=512, pad_token_id=0,
        )
    if kind == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=hidden * 2, max_position_embeddings=512,
            pad_token_id=0, bos_token_id=4, eos_token_id=5, tie_word_embeddings=False,
        )
    raise ValueError(f"unknown tiny model kind {kind!r}: use bert or llama")


def save_tiny_model(out_dir: str | Path, kind: str = "bert", hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Build a random model and its tokenizer from config and `save_pretrained` both to `out_dir`."""
    import torch
    from transformers import AutoModel

    out = Path(out_dir)
    tokenizer = build_tokenizer(kind)
    torch.manual_seed(seed)
    model = AutoModel.from_config(tiny_config(kind, len(tokenizer), hidden, layers))
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def toy_sentences(n: int, seed: int = 0, min_words: int = 6, max_words: int = 14) -> list[str]:
    rng = random.Random(seed)
    names = sorted(TOPICS)
    sentences = []
    for _ in range(n):
        topic = TOPICS[names[rng.randrange(len(names))]]
        words = [rng.choice(topic) if rng.random() < 0.6 else rng.choice(FILLER) for _ in range(rng.randint(min_words, max_words))]
        sentences.append(" ".join(words))
    return sentences


def write_toy_corpus(path: str | Path, n_docs: int = 64, seed: int = 0, fmt: str = "jsonl") -> Path:
    """Write `n_docs` toy documents as jsonl ({"text": ...}) or txt (one per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    docs = toy_sentences(n_docs, seed)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    elif fmt == "txt":
        path.write_text("".join(d + "\n" for d in docs))
    else:
        raise ValueError(f"unknown corpus format {fmt!r}: use jsonl or txt")
    return path


# ----------------------------------------------------------------------------- launchers as subprocesses

REPO_ROOT = Path(__file__).resolve().parent.parent
PARTITION_ALL_DS_CONFIG = str(REPO_ROOT / "tests" / "ds_z3_partition_all.json")
"""ZeRO-3 with every parameter partitioned (persistence threshold 0), for tests on tiny models."""


def launch_env(extra: dict | None = None) -> dict:
    """Environment for a child launcher: offline hub, CPU DeepSpeed, cached ops, no stray rank vars."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI_", "PMIX_", "SLURM_"))}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".torch_extensions"))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    # `python`, `deepspeed` and `mpirun` in a command mean this interpreter's environment.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


def _bin(name: str) -> str:
    """A launcher next to this interpreter (the venv's deepspeed / mpirun), else from PATH."""
    import shutil
    import sys

    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} nor on PATH")
    return found


def run_command(cmd: list[str], timeout: float = 300, env: dict | None = None, check: bool = True, cwd=None):
    """Run `cmd`, return the CompletedProcess; on failure raise with the output's tail."""
    import subprocess

    proc = subprocess.run(
        cmd, cwd=cwd or REPO_ROOT, env=launch_env(env), capture_output=True, text=True, timeout=timeout,
        start_new_session=True,
    )
    if check and proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        raise RuntimeError(f"command failed with exit code {proc.returncode}: {' '.join(cmd)}\n{tail}")
    return proc


def remove_shm_buffers(since: float) -> None:
    """Delete DeepSpeed's /dev/shm all-reduce buffers made since `since` (a killed rank leaves its own)."""
    for buffer in Path("/dev/shm").glob("deepspeed_*"):
        try:
            if buffer.stat().st_mtime >= since - 1:
                buffer.unlink()
        except OSError:
            pass


def deepspeed_cmd(script: str | Path, args=(), nproc: int = 2) -> list[str]:
    from dist_sense.comm import free_port

    return [_bin("deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), str(script), *map(str, args)]


def mpirun_cmd(script: str | Path, args=(), nproc: int = 2) -> list[str]:
    import sys

    return [_bin("mpirun"), "-n", str(nproc), sys.executable, str(script), *map(str, args)]


def run_deepspeed(script, args=(), nproc: int = 2, timeout: float = 300, env=None, check: bool = True):
    """`deepspeed --num_gpus N --master_port FREE script args` as a subprocess."""
    return run_command(deepspeed_cmd(script, args, nproc), timeout=timeout, env=env, check=check)


def run_mpirun(script, args=(), nproc: int = 2, timeout: float = 300, env=None, check: bool = True):
    """`mpirun -n N python script args` as a subprocess."""
    return run_command(mpirun_cmd(script, args, nproc), timeout=timeout, env=env, check=check)


def edit_manifest(path: str | Path, change) -> Path:
    """Rewrite a manifest (or index.json) with `change` applied (a dict to merge, or a function of the
    old content) and a valid checksum: a consistent but different manifest, as another run would write."""
    from dist_sense.formats import manifest

    data = json.loads(Path(path).read_text())
    data = change(data) if callable(change) else {**data, **change}
    return manifest.atomic_write_json(path, manifest.with_checksum(data))
