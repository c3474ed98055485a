"""One real tiny run for the encoder and evaluation tests: extract, build_dict, label, distill (kd and mse).

Built once per test session (the `distilled_run` fixture, imported by both test files, caches
it) with the real launchers as subprocesses on the tiny Llama, plus probe data whose truth is
known: sentences labelled by topic, and word-in-context pairs around the toy corpus's
ambiguous words (same=True when both sentences come from the same topic).
"""
from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import helpers as testing
import pytest

AMBIGUOUS = ("bank", "bat", "spring", "run", "field")
DISTILL = ["distill.layers=1", "distill.steps=5", "distill.global_batch_size=8", "distill.micro_batch_size=8",
           "distill.eval_every=0", "distill.save_every=5"]
_BUILT: dict = {}


def topic_sentence(rng: random.Random, topic: str, word: str | None = None, n_words: int = 9) -> tuple[str, int, int]:
    """(a toy sentence of `topic`, the char span of `word` in it); like testing.toy_sentences, topic known."""
    words = [rng.choice(testing.TOPICS[topic]) if rng.random() < 0.6 else rng.choice(testing.FILLER)
             for _ in range(n_words)]
    at = rng.randrange(n_words)
    if word is not None:
        words[at] = word
    start = sum(len(w) + 1 for w in words[:at])
    return " ".join(words), start, start + len(words[at])


def write_topic_probe(path: Path, n: int = 120, seed: int = 11) -> Path:
    """{"text", "label"} lines: a sentence and the topic it was drawn from."""
    rng = random.Random(seed)
    names = sorted(testing.TOPICS)
    lines = [json.dumps({"text": topic_sentence(rng, names[i % len(names)])[0], "label": names[i % len(names)]})
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_wic_pairs(path: Path, per_word: int = 12, seed: int = 12) -> Path:
    """Pairs of sentences sharing an ambiguous word; same=True when both come from the same topic."""
    rng = random.Random(seed)
    lines = []
    for word in AMBIGUOUS:
        topics = sorted(t for t, words in testing.TOPICS.items() if word in words)
        for i in range(per_word):
            first = rng.choice(topics)
            second = first if i % 2 == 0 else rng.choice([t for t in topics if t != first])
            (t1, s1, e1), (t2, s2, e2) = topic_sentence(rng, first, word), topic_sentence(rng, second, word)
            lines.append(json.dumps({"text1": t1, "start1": s1, "end1": e1, "text2": t2, "start2": s2, "end2": e2,
                                     "same": first == second}))
    path.write_text("\n".join(lines) + "\n")
    return path


def run_together(commands: list[list[str]], timeout: float = 400) -> None:
    """Run launcher commands side by side (they mostly wait on start-up), failing with the output's tail."""
    procs = [subprocess.Popen(cmd, cwd=testing.REPO_ROOT, env=testing.launch_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for cmd in commands]
    try:
        for cmd, proc in zip(commands, procs):
            out, _ = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"exit code {proc.returncode}: {' '.join(cmd)}\n{out[-6000:]}")
    finally:
        for proc in procs:  # a failure or a timeout must not leave the other launcher running
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def build_run(root: Path, teacher: Path) -> dict:
    """The run directory (dictionary, labels, student/final, student_mse/final) and its launcher args."""
    run_dir = root / "run"
    docs = testing.write_toy_corpus(root / "docs.jsonl", n_docs=80, seed=3)
    probe, wic = write_topic_probe(root / "topics.jsonl"), write_wic_pairs(root / "wic.jsonl")
    args = [f"run_dir={run_dir}", f"model.teacher={teacher}", f"corpus.path={docs}", "corpus.max_length=16",
            "extract.cap=30", "kmeans.k=3", "label.batch_size=8", "label.store_hidden=true", *DISTILL,
            f"eval.probe_tasks=topic={probe}", f"eval.wic_path={wic}", "eval.max_documents=40", "eval.batch_size=8"]
    for stage in ("extract", "build_dict", "label"):
        testing.run_command(["python", f"launcher/{stage}.py", *args], timeout=400)
    # The MSE baseline (RUN/student_mse) trains beside the KD student (RUN/student), at the same time.
    run_together([["python", "launcher/distill.py", *args], ["python", "launcher/distill.py", *args, "distill.loss=mse"]])
    return {"run_dir": run_dir, "args": args, "teacher": teacher, "docs": docs, "probe": probe, "wic": wic}


@pytest.fixture(scope="session")
def distilled_run(tmp_path_factory, tiny_llama) -> dict:
    """The tiny run, built once per session however many test modules import this fixture."""
    key = str(tiny_llama)
    if key not in _BUILT:
        _BUILT[key] = build_run(tmp_path_factory.mktemp("distilled_run"), tiny_llama)
    return _BUILT[key]
