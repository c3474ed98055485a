"""Test harness: offline hub, CPU DeepSpeed, tiny models built from config, gpu/slow markers."""
import os
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import helpers as testing
import pytest  # noqa: E402

from dist_sense.runtime import backend

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(testing.REPO_ROOT / ".torch_extensions"))


_SESSION_START = time.time()


def pytest_sessionfinish(session, exitstatus):
    # DeepSpeed's CPU all-reduce leaves a /dev/shm buffer per rank (tens of MB each), and a
    # killed rank never removes its own: without this the suite fills /dev/shm (RAM) run by run.
    testing.remove_shm_buffers(since=_SESSION_START)


def pytest_collection_modifyitems(config, items):
    if backend.gpu_count() > 0:
        return
    skip = pytest.mark.skip(reason="needs a usable CUDA GPU (cupy found no device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A 2-layer, hidden-32 BERT with a word-level tokenizer, saved with save_pretrained."""
    return testing.save_tiny_model(tmp_path_factory.mktemp("tiny_bert"), kind="bert")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A 2-layer, hidden-32 Llama-style decoder with a word-level tokenizer."""
    return testing.save_tiny_model(tmp_path_factory.mktemp("tiny_llama"), kind="llama")


@pytest.fixture(scope="session")
def toy_corpus(tmp_path_factory):
    """64 short documents mixing topics around ambiguous words, as jsonl."""
    return testing.write_toy_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl", n_docs=64)
