"""Tokens/s of the 2-of-6-layer student with sense snapping against the whole teacher.

Same WordNet batches (32 windows of up to 64 tokens), same process and threads, both
in fp32. The student is the demo teacher's first 2 layers (speed does not depend on its
training); snapping uses the benchmark dictionary (k = 20) through SnapTable, as
SenseEncoder does. speedup = student tokens/s / teacher tokens/s.
"""
from __future__ import annotations

import time

import torch

from bench import common


def tokens_per_s(forward, batches) -> float:
    forward(*batches[0])  # warm-up
    tokens, start = 0, time.perf_counter()
    for ids, mask in batches:
        forward(ids, mask)
        tokens += int(mask.sum())
    return tokens / (time.perf_counter() - start)


def main() -> dict:
    common.single_process_env()
    from transformers import AutoModel

    from dist_sense.config import RunConfig
    from dist_sense.formats.dictionary import SenseDictionary
    from dist_sense.model.encoder import SnapTable
    from dist_sense.model.student import build_student
    from dist_sense.model.teacher import resolve_model_path

    dictionary = SenseDictionary.load(common.teacher_dictionary() / "dictionary")
    table = SnapTable(dictionary, "dot", "cpu")
    teacher = AutoModel.from_pretrained(resolve_model_path(common.DEMO_MODEL)).eval()
    student = build_student(RunConfig.load(None, [f"model.teacher={common.DEMO_MODEL}", "distill.layers=2"]), 384).eval()
    batches = common.text_batches(1200, 32, 64)

    @torch.no_grad()
    def teacher_forward(ids, mask):
        return teacher(input_ids=ids, attention_mask=mask).last_hidden_state

    @torch.no_grad()
    def student_forward(ids, mask):
        states = student(ids, mask)
        valid = mask.bool()
        return table.snap(ids[valid], states[valid])

    rounds = [(tokens_per_s(teacher_forward, batches), tokens_per_s(student_forward, batches)) for _ in range(2)]
    teacher_tps, student_tps = max(r[0] for r in rounds), max(r[1] for r in rounds)
    figures = {"speedup": student_tps / teacher_tps, "teacher_tokens_per_s": teacher_tps,
               "student_tokens_per_s": student_tps, "student_layers": 2, "teacher_layers": 6, "batches": len(batches)}
    return common.record("student_vs_teacher", figures, {"speedup": ">= 2.5"})


if __name__ == "__main__":
    main()
