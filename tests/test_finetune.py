"""The GLUE setting's fine-tuned teacher: task files, config sections, the head, the finetune stage."""
import json
import random
from pathlib import Path

import helpers as testing
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dist_sense.config import ConfigError, RunConfig, describe
from dist_sense.formats.corpus import CorpusError
from dist_sense.formats.tasks import TaskError, collate, encode_split, load_task
from dist_sense.model import classifier
from dist_sense.model.classifier import TaskHead, TaskHeadError, head_logits, load_task_head
from dist_sense.stages.finetune.data import TaskBatches, held_out_batches
from dist_sense.stages.finetune.train import engine_config

SCRIPT = "launcher/finetune.py"
TOPIC_NAMES = ("money", "season", "sport")
"""The toy task's classes: the topic a sentence was drawn from (TOPICS of tests/helpers.py)."""
SETTINGS = {"finetune.steps": 30, "finetune.global_batch_size": 16, "finetune.micro_batch_size": 8,
            "finetune.lr": 2e-3, "finetune.warmup_steps": 3, "finetune.eval_every": 10, "finetune.save_every": 5,
            "finetune.max_length": 32}


def topic_examples(n: int, seed: int) -> list[dict]:
    """Toy sentences labelled by the topic their content words come from."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = TOPIC_NAMES[rng.randrange(len(TOPIC_NAMES))]
        words = [rng.choice(testing.TOPICS[topic]) if rng.random() < 0.6 else rng.choice(testing.FILLER)
                 for _ in range(rng.randint(5, 10))]
        words[0] = rng.choice(testing.TOPICS[topic])  # never a sentence of filler only
        rows.append({"sentence": " ".join(words), "label": topic})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    return {"train": write_jsonl(root / "train.jsonl", topic_examples(160, seed=1)),
            "validation": write_jsonl(root / "validation.jsonl", topic_examples(48, seed=2)),
            "test": write_jsonl(root / "test.jsonl", topic_examples(32, seed=3))}


def args_for(run_dir, teacher, files, **extra) -> list[str]:
    values = {"run_dir": run_dir, "model.teacher": teacher, "task.name": "topics", "task.train": files["train"],
              "task.validation": files["validation"], "task.test": files["test"], "task.text_field": "sentence",
              **SETTINGS, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def config_for(run_dir, teacher, files, **extra) -> RunConfig:
    return RunConfig.load(None, args_for(run_dir, teacher, files, **extra))


# ----------------------------------------------------------------------------- config


def test_task_and_finetune_sections_are_listed_and_checked():
    listing = describe()
    for key in ("task.train=''", "task.text_pair_field=''", "finetune.pooling='first_token'",
                "finetune.ds_config='ds_configs/z2.json'", "finetune.max_length=128"):
        assert key in listing
    cfg = RunConfig.load(None, ["finetune.global_batch_size=16", "finetune.micro_batch_size=4"])
    assert cfg.finetune.batch_split(1) == (4, 4) and cfg.finetune.batch_split(4) == (4, 1)
    with pytest.raises(ConfigError, match=r"finetune.global_batch_size=16 .* finetune.micro_batch_size=4 x world size 8"):
        cfg.finetune.batch_split(8)
    with pytest.raises(ConfigError, match=r"finetune.pooling='cls': must be one of first_token, mean"):
        RunConfig.load(None, ["finetune.pooling=cls"])
    with pytest.raises(ConfigError, match=r"task.text_field='s', task.label_field='s'"):
        RunConfig.load(None, ["task.text_field=s", "task.label_field=s"])
    with pytest.raises(ConfigError, match=r"unknown key finetune.lerning_rate"):
        RunConfig.load(None, ["finetune.lerning_rate=1"])


def test_engine_config_takes_batches_and_optimizer_from_finetune(tmp_path):
    cfg = RunConfig.load(None, ["finetune.lr=1e-4", "finetune.global_batch_size=32", "finetune.micro_batch_size=8"])
    ds = engine_config(cfg, micro=8, accum=4)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (8, 4, 32)
    assert ds["optimizer"]["params"]["lr"] == 1e-4 and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["zero_optimization"]["stage"] == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match=r"bad.json: zero_optimization.stage=3"):
        engine_config(RunConfig.load(None, [f"finetune.ds_config={bad}"]), 8, 4)


# ----------------------------------------------------------------------------- task files


def task_cfg(**values):
    return RunConfig.load(None, [f"task.{k}={v}" for k, v in values.items()]).task


def test_labels_are_the_sorted_train_labels_in_every_format(tmp_path):
    rows = [{"s": "bank loan", "t": "river water", "y": "b"}, {"s": "bat ball", "t": "game", "y": "a"},
            {"s": "spring rain", "t": "tree", "y": "c"}]
    import pandas as pd

    frame = pd.DataFrame(rows)
    frame.to_csv(tmp_path / "train.csv", index=False)
    frame.iloc[:2].to_parquet(tmp_path / "validation.parquet")
    write_jsonl(tmp_path / "test.jsonl", rows[::-1])
    task = load_task(task_cfg(train=tmp_path / "train.csv", validation=tmp_path / "validation.parquet",
                              test=tmp_path / "test.jsonl", text_field="s", text_pair_field="t", label_field="y"))
    assert task.labels == ["a", "b", "c"] and task.n_classes == 3
    assert task.splits["train"].label_ids.tolist() == [1, 0, 2]
    assert task.splits["validation"].label_ids.tolist() == [1, 0] and task.splits["test"].label_ids.tolist() == [2, 0, 1]
    assert task.splits["train"].pairs == ["river water", "game", "tree"]
    write_jsonl(tmp_path / "ints.jsonl", [{"text": "bank", "label": 10}, {"text": "bat", "label": 2}])
    numbers = load_task(task_cfg(train=tmp_path / "ints.jsonl", validation=tmp_path / "ints.jsonl"))
    assert numbers.labels == [2, 10] and numbers.splits["train"].label_ids.tolist() == [1, 0]
    assert numbers.splits["train"].pairs is None and "test" not in numbers.splits


@pytest.mark.parametrize("case, pattern", [
    ("missing split", r"task.validation=.*nowhere.jsonl: the validation split's file does not exist"),
    ("missing label field", r"train.jsonl: no field 'category' \(task.label_field\) in the train split; its "
                            r"columns are \['text', 'label'\]"),
    ("unseen label", r"validation.jsonl: label 'cheese' \(str\) in row 1 \(field 'label'\) never occurs in the "
                     r"train split .*train.jsonl, whose labels are 'money', 'sport'"),
    ("single class", r"train.jsonl: every one of its 2 examples has label 'money'"),
    ("empty split", r"validation.jsonl: the validation split \(task.validation\) is an empty file"),
    ("non-string text", r"validation.jsonl: field 'text' in row 0 is int 7, not text"),
    ("blank text", r"validation.jsonl: field 'text' in row 1 is blank"),
    ("null label", r"validation.jsonl: label 'None' in row 0 \(field 'label'\) is NoneType"),
])
def test_task_errors_name_the_file_and_field(tmp_path, case, pattern):
    train = [{"text": "bank loan", "label": "money"}, {"text": "bat ball", "label": "sport"}]
    validation = [{"text": "bank", "label": "money"}, {"text": "bat", "label": "sport"}]
    values = {"train": tmp_path / "train.jsonl", "validation": tmp_path / "validation.jsonl"}
    if case == "missing split":
        values["validation"] = tmp_path / "nowhere.jsonl"
    elif case == "missing label field":
        values["label_field"] = "category"
    elif case == "unseen label":
        validation[1]["label"] = "cheese"
    elif case == "single class":
        train[1]["label"] = "money"
    elif case == "empty split":
        validation = []
    elif case == "non-string text":
        validation[0]["text"] = 7
    elif case == "blank text":
        validation[1]["text"] = "  "
    elif case == "null label":
        validation[0]["label"] = None
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "validation.jsonl", validation)
    with pytest.raises(TaskError, match=pattern) as info:
        load_task(task_cfg(**values))
    assert isinstance(info.value, CorpusError)  # the CLI prints it as one line, exit code 2


def test_examples_are_encoded_with_their_special_tokens_marked(tmp_path):
    write_jsonl(tmp_path / "pairs.jsonl", [{"text": "bank loan money", "pair": "river", "label": 0},
                                          {"text": "bat", "pair": "game team", "label": 1}])
    task = load_task(task_cfg(train=tmp_path / "pairs.jsonl", validation=tmp_path / "pairs.jsonl",
                              text_pair_field="pair"))
    tokenizer = testing.build_tokenizer("bert")
    encoded = encode_split(task.splits["train"], tokenizer, max_length=6)
    assert encoded.truncated == 1 and [len(ids) for ids in encoded.input_ids] == [6, 6]  # the first: 7 cut to 6
    assert encoded.special[0].tolist() == [True, False, False, True, False, True]
    assert tokenizer.decode(encoded.input_ids[0]) == "[CLS] bank loan [SEP] river [SEP]"
    batch = collate(encoded, [1, 0], pad_id=tokenizer.pad_token_id)
    assert batch["labels"].tolist() == [1, 0] and batch["special_mask"].shape == (2, 6)
    assert tokenizer.decode(batch["input_ids"][0]) == "[CLS] bat [SEP] game team [SEP]"


# ----------------------------------------------------------------------------- the head


def hand_made_head(pooling: str) -> TaskHead:
    head = TaskHead(2, ["no", "yes"], pooling, dropout=0.5).eval()
    with torch.no_grad():
        head.dense.weight.copy_(torch.eye(2))
        head.dense.bias.zero_()
        head.classifier.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        head.classifier.bias.copy_(torch.tensor([0.0, 1.0]))
    return head


def test_head_logits_pool_only_content_tokens():
    # Row 0: [CLS] a b [SEP]; row 1: [CLS] c [SEP] [PAD] (padding marked special, as collate does).
    states = torch.tensor([[[9.0, 9.0], [0.5, 0.0], [0.0, 1.0], [7.0, 7.0]],
                           [[9.0, 9.0], [0.2, -0.4], [7.0, 7.0], [5.0, 5.0]]])
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    special = torch.tensor([[1, 0, 0, 1], [1, 0, 1, 1]])

    def expected(pooled):
        hidden = torch.tanh(pooled)
        return torch.stack([hidden[:, 0], 2 * hidden[:, 1] + 1], dim=1)

    first = head_logits(hand_made_head("first_token"), states, attention, special)
    torch.testing.assert_close(first, expected(torch.tensor([[0.5, 0.0], [0.2, -0.4]])))
    mean = head_logits(hand_made_head("mean"), states, attention, special)
    torch.testing.assert_close(mean, expected(torch.tensor([[0.25, 0.5], [0.2, -0.4]])))
    # Padding that is attended-off but not marked special is left out all the same.
    torch.testing.assert_close(head_logits(hand_made_head("mean"), states, attention, torch.tensor(
        [[1, 0, 0, 1], [1, 0, 1, 0]])), mean)
    with pytest.raises(ValueError, match=r"rows \[1\] of the batch hold only special or padding tokens"):
        head_logits(hand_made_head("mean"), states, attention, torch.tensor([[1, 0, 0, 1], [1, 1, 1, 1]]))


def test_saved_head_on_the_reloaded_backbone_gives_the_same_logits(tiny_bert, tmp_path):
    from transformers import AutoModel

    torch.manual_seed(0)
    model = classifier.build_task_model(str(tiny_bert), ["a", "b", "c"], "mean", info={"task": "toy"}).eval()
    tokenizer = testing.build_tokenizer("bert")
    batch = tokenizer(["bank loan money", "bat"], padding=True, return_special_tokens_mask=True, return_tensors="pt")
    inputs = (batch["input_ids"], batch["attention_mask"], batch["special_tokens_mask"])
    with torch.no_grad():
        expected = model(*inputs)
    out = classifier.save_task_model(model, tmp_path / "tuned", tokenizer, extra={"steps": 0})
    backbone = AutoModel.from_pretrained(out).eval()
    head = load_task_head(out)
    with torch.no_grad():
        got = head_logits(head, backbone(input_ids=inputs[0], attention_mask=inputs[1]).last_hidden_state, *inputs[1:])
    assert torch.equal(got, expected)
    info = json.loads((out / classifier.HEAD_INFO).read_text())
    assert (info["format"], info["labels"], info["pooling"], info["d"], info["task"]) == (
        classifier.HEAD_FORMAT, ["a", "b", "c"], "mean", 32, "toy")
    assert not any(p.requires_grad for p in head.parameters()) and not head.training


def test_missing_or_foreign_head_files_are_named(tiny_bert, tmp_path):
    with pytest.raises(TaskHeadError, match=rf"{tiny_bert}/task_head.json: not found; .* is not a fine-tuned teacher"):
        load_task_head(tiny_bert)
    torch.manual_seed(0)
    out = classifier.save_task_model(classifier.build_task_model(str(tiny_bert), [0, 1], "first_token"),
                                        tmp_path / "tuned")
    info = json.loads((out / classifier.HEAD_INFO).read_text())
    (out / classifier.HEAD_INFO).write_text(json.dumps({**info, "format": "someone.else"}))
    with pytest.raises(TaskHeadError, match=r"task_head.json: format \('someone.else', 1\), expected"):
        load_task_head(out)
    (out / classifier.HEAD_INFO).write_text(json.dumps({**info, "labels": [0, 1, 2]}))
    with pytest.raises(TaskHeadError, match=r"task_head.safetensors: tensors .* do not make a head of d=32 over 3"):
        load_task_head(out)
    (out / classifier.HEAD_WEIGHTS).unlink()
    with pytest.raises(TaskHeadError, match=r"task_head.safetensors: not found"):
        load_task_head(out)


# ----------------------------------------------------------------------------- batches


def test_ranks_share_out_whole_steps_and_a_position_restores_the_next_batch(task_files):
    task = load_task(task_cfg(train=task_files["train"], validation=task_files["validation"], text_field="sentence"))
    encoded = encode_split(task.splits["train"], testing.build_tokenizer("bert"), 32)
    one = TaskBatches(encoded, task_files["train"], 0, 1, 4, global_batch=8, seed=3)
    ranks = [TaskBatches(encoded, task_files["train"], r, 2, 4, global_batch=8, seed=3) for r in (0, 1)]
    assert one.micro_per_epoch == 2 * ranks[0].micro_per_epoch == 2 * (160 // 8)
    for _ in range(3):  # one step: 2 micro-batches on one rank = 1 on each of two
        step_one = torch.cat([one.next_batch()["labels"], one.next_batch()["labels"]])
        step_two = torch.cat([r.next_batch()["labels"] for r in ranks])
        assert torch.equal(step_one, step_two)
    for _ in range(2 * one.micro_per_epoch - 6):  # into the next epoch
        one.next_batch()
    position = one.position()
    assert position["epoch"] == 1
    want = one.next_batch()
    again = TaskBatches(encoded, task_files["train"], 0, 1, 4, global_batch=8, seed=3)
    again.restore(position)
    assert all(torch.equal(want[k], v) for k, v in again.next_batch().items())
    assert sorted(b["labels"].shape[0] for r in (0, 1) for b in held_out_batches(encoded, r, 2, 64)) == [32, 64, 64]
    with pytest.raises(TaskError, match=r"train.jsonl: its 160 training examples do not fill one step of "
                                        r"finetune.global_batch_size=256"):
        TaskBatches(encoded, task_files["train"], 0, 1, 128, global_batch=256)


def test_length_grouping_keeps_the_epochs_examples_and_makes_steps_of_similar_lengths(task_files):
    task = load_task(task_cfg(train=task_files["train"], validation=task_files["validation"], text_field="sentence"))
    encoded = encode_split(task.splits["train"], testing.build_tokenizer("bert"), 32)
    lengths = np.array([len(row) for row in encoded.input_ids])
    plain = TaskBatches(encoded, task_files["train"], 0, 1, 4, global_batch=8, seed=3)
    grouped = TaskBatches(encoded, task_files["train"], 0, 1, 4, global_batch=8, seed=3, group_steps=5)
    for epoch in (0, 1):
        a, b = plain.epoch_order(epoch), grouped.epoch_order(epoch)
        assert sorted(a.tolist()) == sorted(b.tolist()) and not np.array_equal(a, b)
        # Each run of 5 steps holds the same examples as the plain order's, now sorted into steps.
        for pool in range(0, len(a), 40):
            assert sorted(a[pool:pool + 40].tolist()) == sorted(b[pool:pool + 40].tolist())
        spread = lambda order: np.mean([np.ptp(lengths[order[i:i + 8]]) for i in range(0, len(order), 8)])  # noqa: E731
        assert spread(b) < 0.5 * spread(a), (spread(a), spread(b))
    # Still one order for any world size: the steps of 1 rank x 2 micro-batches are those of 2 ranks x 1.
    ranks = [TaskBatches(encoded, task_files["train"], r, 2, 4, global_batch=8, seed=3, group_steps=5) for r in (0, 1)]
    for _ in range(4):
        step_one = torch.cat([grouped.next_batch()["labels"], grouped.next_batch()["labels"]])
        assert torch.equal(step_one, torch.cat([r.next_batch()["labels"] for r in ranks]))


# ----------------------------------------------------------------------------- real runs of the stage


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(out_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss/ce"] for m in metrics(out_dir) if "loss/ce" in m}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_bert, task_files):
    run_dir = tmp_path_factory.mktemp("finetune")
    proc = testing.run_command(["python", SCRIPT, *args_for(run_dir, tiny_bert, task_files)], timeout=300)
    assert proc.stdout.strip().splitlines()[-1] == str(run_dir / "teacher_tuned" / "final")
    return run_dir


@pytest.mark.slow
def test_the_tuned_teacher_learns_the_task(finished_run):
    out = finished_run / "teacher_tuned"
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 31))
    evals = [m for m in metrics(out) if "eval/accuracy" in m]
    assert [m["step"] for m in evals] == [0, 10, 20, 30]
    chance = 1 / len(TOPIC_NAMES)
    print(f"loss {losses[1]:.3f} -> {losses[30]:.3f}; validation accuracy {evals[0]['eval/accuracy']:.3f} -> "
          f"{evals[-1]['eval/accuracy']:.3f}")
    assert evals[-1]["eval/accuracy"] > chance + 0.3 and np.mean([losses[s] for s in (28, 29, 30)]) < 0.5 * losses[1]
    info = json.loads((out / "final" / classifier.HEAD_INFO).read_text())
    assert info["labels"] == sorted(TOPIC_NAMES) and info["steps"] == 30 and info["task"] == "topics"
    assert info["accuracy"]["validation"] == evals[-1]["eval/accuracy"] and "test" in info["accuracy"]
    assert sorted(p.name for p in (out / "checkpoints").glob("step*")) == ["step25", "step30"]
    assert list((finished_run / "tb" / "finetune").glob("events.out.tfevents.*"))
    assert json.loads((finished_run / "config.json").read_text())["task"]["name"] == "topics"


@pytest.mark.slow
def test_the_tuned_teacher_through_its_own_frozen_head_gives_the_trained_logits(finished_run):
    from transformers import AutoModel

    final = finished_run / "teacher_tuned" / "final"
    check = load_file(final / classifier.HEAD_CHECK)
    backbone = AutoModel.from_pretrained(final).eval()
    head = load_task_head(final)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the trainer ran on one thread (OMP_NUM_THREADS=1): the same sums in the same order
    try:
        with torch.no_grad():
            states = backbone(input_ids=check["input_ids"], attention_mask=check["attention_mask"]).last_hidden_state
            logits = head_logits(head, states, check["attention_mask"], check["special_mask"])
            whole = classifier.load_task_model(final)(*(check[k] for k in ("input_ids", "attention_mask",
                                                                            "special_mask")))
    finally:
        torch.set_num_threads(threads)
    assert logits.shape == (8, 3) and torch.equal(logits, check["logits"]) and torch.equal(whole, check["logits"])
    assert check["labels"].shape == (8,)


@pytest.mark.slow
def test_a_crashed_run_resumes_to_the_same_losses_and_weights(finished_run, tiny_bert, task_files, tmp_path):
    args = args_for(tmp_path, tiny_bert, task_files)
    crashed = testing.run_command(["python", SCRIPT, *args], timeout=300, check=False,
                                  env={"DIST_SENSE_CRASH": "finetune.step:8"})
    assert crashed.returncode != 0
    out = tmp_path / "teacher_tuned"
    assert (out / "checkpoints" / "latest").read_text() == "step5" and not (out / "final").exists()
    resumed = testing.run_command(["python", SCRIPT, *args], timeout=300)
    assert "resumed from" in resumed.stderr and "at step 5" in resumed.stderr
    reference = finished_run / "teacher_tuned"
    assert [m["step"] for m in metrics(out) if "loss/ce" in m] == list(range(1, 31))
    assert train_losses(out) == train_losses(reference)
    for name in ("model.safetensors", classifier.HEAD_WEIGHTS):
        a, b = load_file(out / "final" / name), load_file(reference / "final" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    again = testing.run_command(["python", SCRIPT, *args], timeout=300)
    assert "complete for these settings; nothing to do" in again.stderr


@pytest.mark.slow
def test_another_task_file_is_refused_by_the_finished_output(finished_run, tiny_bert, task_files, tmp_path):
    changed = write_jsonl(tmp_path / "train.jsonl", topic_examples(160, seed=9))
    proc = testing.run_command(["python", SCRIPT, *args_for(finished_run, tiny_bert, {**task_files, "train": changed})],
                               timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "teacher_tuned was made by finetune from other inputs or settings (task_fingerprints.train" in proc.stderr


@pytest.mark.slow
def test_two_ranks_split_the_steps_and_the_evaluation(tiny_bert, task_files, tmp_path):
    testing.run_deepspeed(SCRIPT, args_for(tmp_path, tiny_bert, task_files, **{"finetune.steps": 20}), nproc=2,
                          timeout=300)
    out = tmp_path / "teacher_tuned"
    assert sorted(train_losses(out)) == list(range(1, 21))  # rank 0 alone writes the log, each step once
    evals = [m for m in metrics(out) if "eval/accuracy" in m]
    assert [m["step"] for m in evals] == [0, 10, 20]
    # Both ranks' shares of the 48 validation examples are counted: accuracy is a multiple of 1/48.
    assert all(round(m["eval/accuracy"] * 48, 6).is_integer() for m in evals)
    assert evals[-1]["eval/accuracy"] > 1 / len(TOPIC_NAMES) + 0.2, evals
    marker = json.loads((out / "checkpoints" / "step20" / "dist_sense_complete.json").read_text())
    assert marker["world_size"] == 2 and (out / "final" / classifier.HEAD_WEIGHTS).is_file()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_rerun_ends_like_an_uninterrupted_run(finished_run, tiny_bert, task_files,
                                                                                   tmp_path):
    import signal
    import subprocess
    import time

    args = args_for(tmp_path, tiny_bert, task_files)
    out = tmp_path / "teacher_tuned"
    # Each step slowed to over 0.2 s, so the signal surely comes before the last of the 30 steps.
    proc = subprocess.Popen(["python", SCRIPT, *args], cwd=testing.REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=testing.launch_env({"DIST_SENSE_SLOW": "finetune.step:0.2"}))
    try:
        deadline = time.time() + 120
        while not ((out / "metrics.jsonl").is_file() and len(train_losses(out)) >= 2):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, stderr[-3000:]
    step = max(train_losses(out))
    assert 2 <= step < 30 and f"stopped by SIGTERM at step {step}" in stderr
    assert (out / "checkpoints" / "latest").read_text() == f"step{step}" and not (out / "final").exists()
    resumed = testing.run_command(["python", SCRIPT, *args], timeout=300)
    assert f"at step {step}" in resumed.stderr
    assert train_losses(out) == train_losses(finished_run / "teacher_tuned")


@pytest.mark.slow
@pytest.mark.parametrize("init", ["truncate", "model"])
def test_the_student_baseline_is_the_distilled_students_architecture_tuned_on_the_labels(finished_run, task_files,
                                                                                        tmp_path, init):
    """finetune.backbone=student: the distill stage's student (the tuned teacher's first layer, or a separate
    narrower model with its linear map to the teacher's width) plus a head, trained for distill's steps."""
    from transformers import AutoModel

    from dist_sense.model.student import Student

    tuned = finished_run / "teacher_tuned" / "final"
    extra = {"finetune.backbone": "student", "distill.steps": 12, "distill.global_batch_size": 16,
             "distill.micro_batch_size": 8, "distill.lr": 2e-3, "distill.warmup_steps": 2, "distill.layers": 1,
             "corpus.max_length": 32}
    if init == "model":
        small = tmp_path / "small"
        testing.tiny_config("bert", len(testing.build_tokenizer("bert")), hidden=16, layers=1).save_pretrained(small)
        extra.update({"distill.init": "model", "distill.student_model": small})
    run_dir = tmp_path / "run"
    proc = testing.run_command(["python", SCRIPT, *args_for(run_dir, tuned, task_files, **extra)], timeout=300)
    final = run_dir / "student_tuned" / "final"
    assert proc.stdout.strip().splitlines()[-1] == str(final)
    assert sorted(train_losses(run_dir / "student_tuned")) == list(range(1, 13))  # distill.steps, not finetune's 30
    info = json.loads((final / classifier.HEAD_INFO).read_text())
    assert info["backbone"] == "student" and info["d"] == 32 and info["steps"] == 12  # the teacher's width
    student_info = json.loads((final / "student.json").read_text())
    assert student_info["init"] == init and student_info["teacher_d"] == 32
    assert student_info["student_d"] == (16 if init == "model" else 32) and student_info["layers"] == 1
    assert list((run_dir / "tb" / "finetune_student").glob("events.out.tfevents.*"))
    model = classifier.load_task_model(final)
    assert isinstance(model.backbone, Student)
    check = load_file(final / classifier.HEAD_CHECK)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the trainer's thread count: the same sums in the same order
    try:
        with torch.no_grad():
            logits = model(*(check[k] for k in ("input_ids", "attention_mask", "special_mask")))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(logits, check["logits"])
    if init == "truncate":  # it started from the tuned teacher's first layer and was trained away from it
        teacher = AutoModel.from_pretrained(tuned).encoder.layer[0].attention.self.query.weight
        trained = model.backbone.backbone.encoder.layer[0].attention.self.query.weight
        assert trained.shape == teacher.shape and not torch.equal(trained, teacher)
    evals = [m for m in metrics(run_dir / "student_tuned") if "eval/accuracy" in m]
    assert evals[-1]["eval/accuracy"] > 1 / len(TOPIC_NAMES), evals
