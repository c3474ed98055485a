"""The MTEB wrapper (stages/evaluate/mteb_tasks.py): local tasks through the mteb package itself, bad task files."""
import json

import numpy as np
import pytest

from dist_sense.config import ModelConfig
from dist_sense.stages.evaluate.mteb_tasks import MtebSystem, local_task, read_task
from dist_sense.stages.evaluate.probes import EvalError

pytest.importorskip("mteb", reason="mteb (a requirement) is not installed")


def write_task(folder, splits):
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    return folder


def topic_rows(n, seed):
    import random

    from run_fixture import topic_sentence

    rng = random.Random(seed)
    return [(topic_sentence(rng, topic)[0], topic) for topic in ("money", "sport") * (n // 2)]


@pytest.fixture(scope="module")
def teacher_encoder(tiny_llama):
    from dist_sense.formats.dictionary import SenseDictionary
    from dist_sense.model.encoder import SenseEncoder
    from dist_sense.model.loading import frozen_teacher
    from dist_sense.model.teacher import layer_states, load_tokenizer

    cfg = ModelConfig(teacher=str(tiny_llama))
    tokenizer, net = load_tokenizer(cfg), frozen_teacher(cfg, "cpu")
    vocab = tokenizer.get_vocab()
    rng = np.random.default_rng(0)
    dictionary = SenseDictionary([vocab["bank"], vocab["spring"]], [0, 2, 4], rng.normal(0, 1, (4, 32)).astype(np.float32))
    return SenseEncoder(net, tokenizer, dictionary, lambda ids, mask: layer_states(net, ids, mask, 2, 2), device="cpu")


def test_a_local_task_runs_through_mteb_itself(teacher_encoder, tmp_path):
    import mteb

    folder = write_task(tmp_path / "topics", {"train": topic_rows(40, 1), "test": topic_rows(30, 2)})
    data = read_task(folder)
    assert data["train"][1][:2] == [0, 1]  # labels numbered by their sorted values: money 0, sport 1
    for kind in ("continuous", "senses"):
        system = MtebSystem(teacher_encoder, f"teacher_{kind}", kind, batch_size=8)
        result = mteb.evaluate(system, [local_task("topics", data)], cache=None, show_progress_bar=False)
        scores = result.task_results[0].scores["test"][0]
        assert 0.6 < scores["accuracy"] <= 1, scores  # word identity tells the two topics apart
        assert len(scores["scores_per_experiment"]) == 10
    # What mteb is handed is SenseEncoder's own pooled embedding of each text.
    texts = data["test"][0][:5]
    encoded = teacher_encoder.encode(texts)
    got = MtebSystem(teacher_encoder, "teacher", "senses", 8).encode([{"text": texts[:3]}, {"text": texts[3:]}])
    np.testing.assert_allclose(got, np.stack([e.sentence_sense_embedding for e in encoded]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("splits, needle", [
    ({"train": [("a", 1), ("b", 1)], "test": [("c", 1)]}, "a single class"),
    ({"train": [("a", 1), ("b", 2)]}, "test.jsonl not found"),
    ({"train": [("a", 1), ("b", 2)], "test": [("c", 3)]}, "never occur in train.jsonl"),
    ({"train": [], "test": [("c", 1)]}, "no examples"),
])
def test_bad_task_folders_are_refused_by_name(tmp_path, splits, needle):
    folder = write_task(tmp_path / "bad", splits)
    with pytest.raises(EvalError, match=needle):
        read_task(folder)
    (folder / "train.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(EvalError, match=r"train.jsonl:1: not a"):
        read_task(folder)
