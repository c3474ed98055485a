"""Stage 3 (training): distil a student against the sense labels under DeepSpeed ZeRO-2.

Inputs: RUN/dictionary/ and RUN/labels/ (the teacher does not run here). Output: RUN/student/
  checkpoints/stepN/   DeepSpeed checkpoints (every distill.save_every steps and at the end);
                       client state: data position, every rank's RNG state, the run identity
  checkpoints/run.json the identity of the run the checkpoints belong to (fingerprints, student)
  metrics.jsonl        one JSON line per step and per evaluation (rank 0)
  final/               save_student of the last step (written to a temporary name, renamed)
A rerun resumes from the newest checkpoint that loads on every rank: weights, optimizer, schedule, data
position, RNG (checkpoints.py). SIGTERM stops the run at the next step with a checkpoint and exit code 3
(stopping.py).
Batch sizes come from distill.* through `DistillConfig.batch_split`; ds_configs/ hold engine settings only.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from dist_sense import comm
from dist_sense.config import RunConfig
from dist_sense.formats.dictionary import SenseDictionary
from dist_sense.formats.labels import LabelData, LabelsError, check_labels_match_dictionary, read_labels_manifest
from dist_sense.formats.manifest import atomic_write_json, file_fingerprint
from dist_sense.model.losses import mse_loss, positions_per_chunk, sense_kd_loss, sense_table
from dist_sense.model.student import build_student, check_vocabulary, save_student
from dist_sense.model.teacher import load_tokenizer
from dist_sense.runtime.faults import crash_point
from dist_sense.runtime.metrics import StepLog
from dist_sense.stages.distill.checkpoints import (  # noqa: F401
    CheckpointError,
    check_checkpoint_identity,
    latest_tag,
    resume,
    save_checkpoint,
    seed_everything,
)
from dist_sense.stages.distill.stopping import STOPPED_EXIT_CODE, StopOnSignal, stopped  # noqa: F401
from dist_sense.stages.engine import MIN_LR_RATIO, lr_factor, start_engine, training_engine_config  # noqa: F401
from dist_sense.stages.guard import open_stage

log = comm.get_logger("dist_sense.distill")



# ----------------------------------------------------------------------------- settings


def student_dir(cfg: RunConfig) -> Path:
    """RUN/student for the sense loss; RUN/student_mse for the MSE baseline, so both can live in one run."""
    return cfg.run_path / ("student" if cfg.distill.loss == "kd" else "student_mse")


def engine_config(cfg: RunConfig, micro: int, accum: int) -> dict:
    """distill.ds_config with batch sizes, optimizer values and bf16 "auto" filled in (stages/engine.py)."""
    return training_engine_config(cfg.distill, "distill", micro, accum, "student")


def run_identity(cfg: RunConfig, labels_manifest: dict) -> dict:
    """What a checkpoint must share with this run to be resumed by it."""
    labels_file = cfg.run_path / "labels" / "manifest.json"
    return {"labels_fingerprint": file_fingerprint([labels_file]),
            "dictionary_fingerprint": labels_manifest.get("dictionary_fingerprint"),
            "teacher_fingerprint": labels_manifest.get("teacher_fingerprint"),
            "init": cfg.distill.init, "layers": cfg.distill.layers if cfg.distill.init == "truncate" else None,
            "student_model": cfg.distill.student_model, "loss": cfg.distill.loss,
            "freeze_embeddings": cfg.distill.freeze_embeddings}


def prepare(cfg: RunConfig, world_size: int, check_checkpoints: bool = True) -> dict:
    """Every check that needs no process group: dictionary, labels, loss inputs, batches, checkpoints.

    check_checkpoints: False with --restart-stage, which moves the checkpoints aside anyway."""
    dictionary = SenseDictionary.load(cfg.run_path / "dictionary")
    labels_dir = cfg.run_path / "labels"
    manifest = read_labels_manifest(labels_dir)
    check_labels_match_dictionary(labels_dir, cfg.run_path / "dictionary", manifest, dictionary.meta)
    if cfg.distill.loss == "mse" and not manifest.get("store_hidden"):
        raise LabelsError(f"{labels_dir / 'manifest.json'}: distill.loss=mse needs the teacher's states; "
                          f"rerun the label stage with label.store_hidden=true")
    micro, accum = cfg.distill.batch_split(world_size)
    identity = run_identity(cfg, manifest)
    ckpt_dir = student_dir(cfg) / "checkpoints"
    if check_checkpoints:
        check_checkpoint_identity(ckpt_dir, identity)
    return {"dictionary": dictionary, "manifest": manifest, "micro": micro, "accum": accum,
            "identity": identity, "ckpt_dir": ckpt_dir}


# ----------------------------------------------------------------------------- one step, evaluation


class SenseTable:
    """The dictionary's padded senses on the training device, and the loss settings that use them."""

    def __init__(self, dictionary: SenseDictionary, device, loss: str, temperature: float, dtype=torch.float32,
                 similarity: str = "dot"):
        centres, mask, token_to_row = dictionary.padded(np)
        # T x K_max x d can be large: stored in the student's compute dtype (bf16 on GPUs), logits in fp32.
        # Transformed for the labels' similarity, so the student is scored the way the teacher was.
        self.centres = sense_table(torch.from_numpy(np.ascontiguousarray(centres)), similarity).to(device, dtype)
        self.mask = torch.from_numpy(np.ascontiguousarray(mask)).to(device)
        self.token_to_row = torch.from_numpy(np.ascontiguousarray(token_to_row)).to(device)
        self.chunk = positions_per_chunk(self.centres.shape[1], self.centres.shape[2])
        self.loss, self.temperature, self.similarity = loss, temperature, similarity

    def compute(self, states, batch: dict):
        """(loss to optimise, stats tensors n / correct_top1 / correct_top5) for one micro-batch."""
        args = (batch["input_ids"], batch["targets"], self.centres, self.mask, self.token_to_row)
        if self.loss == "mse":
            loss, _ = mse_loss(states, batch["teacher"], batch["attention_mask"])
            with torch.no_grad():  # sense agreement, so both losses are compared on one scale
                _, stats = sense_kd_loss(states.detach(), *args, chunk_positions=self.chunk, similarity=self.similarity)
            return loss, stats
        return sense_kd_loss(states, *args, soft_ids=batch.get("soft_ids"), soft_probs=batch.get("soft_probs"),
                             chunk_positions=self.chunk, temperature=self.temperature, similarity=self.similarity)


def _on(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(engine, data: LabelData, senses: SenseTable, accum: int, stop: StopOnSignal | None = None) -> dict:
    """One optimizer step (accum micro-batches per rank); returns metrics averaged over ranks, and in
    "stop" how many ranks have received SIGTERM (reduced with the metrics: the same on every rank)."""
    sums = torch.zeros(7, dtype=torch.float64, device=comm.device())
    for _ in range(accum):
        batch = _on(data.next_batch(), engine.device)
        states = engine(batch["input_ids"], batch["attention_mask"])
        loss, stats = senses.compute(states, batch)
        engine.backward(loss)
        engine.step()
        tokens = batch["attention_mask"].sum()
        sums[:6] += torch.stack([loss.detach().double(), stats["correct_top1"].double(), stats["correct_top5"].double(),
                                 stats["n"].double(), tokens.double(), torch.ones((), dtype=torch.float64, device=sums.device)])
    sums[6] = stop.flag() if stop else 0.0  # read after the step's work: a signal during it stops at this step
    comm.all_reduce_sum(sums)
    loss_sum, top1, top5, n, tokens, micro, votes = sums.tolist()
    return {"loss": loss_sum / micro, "acc/top1": top1 / max(n, 1), "acc/top5": top5 / max(n, 1),
            "labelled": n, "tokens": tokens, "stop": int(votes)}


@torch.no_grad()
def evaluate(engine, data: LabelData, senses: SenseTable) -> dict | None:
    """Loss and sense agreement on the held-out split, summed over ranks (None if it is empty)."""
    module = engine.module
    module.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=comm.device())
    for batch in data.eval_batches():
        batch = _on(batch, engine.device)
        loss, stats = senses.compute(module(batch["input_ids"], batch["attention_mask"]), batch)
        weight = stats["n"].double() if senses.loss == "kd" else batch["attention_mask"].sum().double()
        sums += torch.stack([loss.double() * weight, weight, stats["correct_top1"].double(), stats["correct_top5"].double()])
    module.train()
    comm.all_reduce_sum(sums)
    loss_sum, weight, top1, top5 = sums.tolist()
    if weight == 0:
        return None
    n = weight if senses.loss == "kd" else None
    result = {"eval/loss": loss_sum / weight}
    if n:
        result.update({"eval/top1": top1 / n, "eval/top5": top5 / n})
    return result


# ----------------------------------------------------------------------------- metrics


class MetricsLog(StepLog):
    """RUN/student/metrics.jsonl (student_mse/ for the MSE loss), RUN/tb/distill[_mse], the bar."""

    def __init__(self, cfg: RunConfig, start_step: int):
        self.loss_tag = f"loss/{cfg.distill.loss}"
        super().__init__(student_dir(cfg) / "metrics.jsonl", cfg.run_path,
                         "distill" if cfg.distill.loss == "kd" else "distill_mse", cfg.distill.steps, start_step,
                         "distill")

    def train(self, step: int, stats: dict, lr: float, grad_norm, seconds: float) -> None:
        values = {self.loss_tag: stats["loss"], "acc/top1": stats["acc/top1"], "acc/top5": stats["acc/top5"],
                  "lr": lr, "speed/tokens_per_s": stats["tokens"] / max(seconds, 1e-9)}
        if grad_norm is not None:
            values["grad_norm"] = float(grad_norm)
        self.write(step, values)
        self.step_done(loss=f"{stats['loss']:.4f}", top1=f"{stats['acc/top1']:.3f}")


# ----------------------------------------------------------------------------- the stage


def run(cfg: RunConfig, restart: bool = False) -> Path:
    """Distil the student into RUN/student/ (resuming from its newest checkpoint) and return that directory.

    On SIGTERM: a checkpoint at the next step, then SystemExit(STOPPED_EXIT_CODE) on every rank.
    restart: move a student/ trained from other labels or settings aside instead of refusing."""
    with StopOnSignal() as stop:  # installed before the (slow) start, so an early signal stops cleanly too
        env = comm.init_torch()
        plan = prepare(cfg, env.world_size, check_checkpoints=not restart)
        out_dir = student_dir(cfg)
        with open_stage(cfg, "distill", out_dir, stage_identity(cfg, plan["identity"]), restart=restart,
                        rank=env.rank, share=comm.broadcast_object) as stage:
            if stage.resumed and (out_dir / "final" / "config.json").is_file():
                log.info("%s is complete for these settings; nothing to do", out_dir / "final")
                return out_dir
            stage.begin()
            return _run(cfg, env, plan, out_dir, stop)


OPERATIONAL_KEYS = ("eval_every", "save_every")
"""distill keys that change how often the run reports and saves, not the weights it ends with."""


def stage_identity(cfg: RunConfig, checkpoint_identity: dict) -> dict:
    """What RUN/student depends on: the checkpoints' identity (labels, dictionary, teacher, student
    shape) plus every distill setting that changes the weights, and the engine config's content."""
    from dataclasses import asdict

    from dist_sense.formats.identity import file_digest

    settings = {k: v for k, v in asdict(cfg.distill).items() if k not in OPERATIONAL_KEYS}
    engine = Path(cfg.distill.ds_config)
    settings["ds_config"] = file_digest(engine) if engine.is_file() else cfg.distill.ds_config
    return {**checkpoint_identity, "distill": settings}


def _run(cfg: RunConfig, env, plan: dict, out_dir: Path, stop: StopOnSignal) -> Path:
    tokenizer = load_tokenizer(cfg.model)
    seed_everything(cfg.distill.seed)  # the same initial student on every rank
    student = build_student(cfg, plan["dictionary"].d)
    check_vocabulary(student, tokenizer)
    engine = _initialize(cfg, student, plan)
    seed_everything(cfg.distill.seed + 1000 * (env.rank + 1))  # dropout differs by rank
    data = LabelData(cfg.run_path / "labels", plan["manifest"], env.rank, env.world_size, plan["micro"],
                     global_batch=cfg.distill.global_batch_size, seed=cfg.distill.seed, eval_fraction=cfg.distill.eval_fraction,
                     pad_id=tokenizer.pad_token_id or 0,
                     skip_fields=() if cfg.distill.loss == "mse" else ("teacher",),  # the sense loss never reads them
                     group_steps=cfg.distill.group_by_length)
    senses = SenseTable(plan["dictionary"], engine.device, cfg.distill.loss, float(plan["manifest"].get("temperature") or 1.0),
                        dtype=torch.bfloat16 if engine.bfloat16_enabled() else torch.float32,
                        similarity=plan["manifest"].get("similarity") or "dot")
    step = resume(engine, plan["ckpt_dir"], plan["identity"], data)
    if env.is_main:
        atomic_write_json(plan["ckpt_dir"] / "run.json", plan["identity"])
    _train(cfg, engine, data, senses, plan, step, stop)
    if env.is_main:
        _write_final(engine, out_dir, tokenizer, plan["identity"], int(engine.global_steps))
    comm.barrier()
    return out_dir


def _initialize(cfg: RunConfig, student, plan: dict):
    if cfg.distill.freeze_embeddings:
        student.backbone.get_input_embeddings().requires_grad_(False)
    engine, trained = start_engine(student, cfg.distill, engine_config(cfg, plan["micro"], plan["accum"]))
    log.info("student %s: %d parameters (%d trained); micro batch %d x %d ranks x %d accumulation = %d windows per step",
             student.info.get("init"), sum(p.numel() for p in student.parameters()), trained, plan["micro"],
             comm.detect().world_size, plan["accum"], cfg.distill.global_batch_size)
    return engine


def _train(cfg: RunConfig, engine, data: LabelData, senses: SenseTable, plan: dict, step: int,
           stop: StopOnSignal) -> None:
    metrics = MetricsLog(cfg, step)
    engine.module.train()  # from_pretrained gives eval mode: a resumed run (no step-0 evaluation) kept dropout off
    every_eval, every_save = cfg.distill.eval_every, cfg.distill.save_every
    if step == 0 and every_eval and (result := evaluate(engine, data, senses)):
        metrics.write(0, result)  # the starting point, for comparison
    if step >= cfg.distill.steps:
        log.info("already trained for %d steps (distill.steps=%d): nothing to do", step, cfg.distill.steps)
        metrics.close()
        return
    saved_at = step
    while step < cfg.distill.steps:
        started, lr = time.time(), engine.get_lr()[0]  # the rate this step uses
        stats = train_step(engine, data, senses, plan["accum"], stop)
        step = int(engine.global_steps)
        crash_point("distill.step")
        metrics.train(step, stats, lr, engine.get_global_grad_norm(), time.time() - started)
        if every_eval and step % every_eval == 0 and step < cfg.distill.steps:
            if result := evaluate(engine, data, senses):
                metrics.write(step, result)
                log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        if every_save and step % every_save == 0:
            save_checkpoint(engine, plan["ckpt_dir"], step, data, plan["identity"])
            saved_at = step
        if stats["stop"] and step < cfg.distill.steps:  # every rank sees the same count at the same step
            if saved_at != step:
                save_checkpoint(engine, plan["ckpt_dir"], step, data, plan["identity"])
            metrics.close()
            raise stopped(step, stats["stop"])
    if saved_at != step or latest_tag(plan["ckpt_dir"]) is None:
        save_checkpoint(engine, plan["ckpt_dir"], step, data, plan["identity"])
    if result := evaluate(engine, data, senses):
        metrics.write(step, result)
        log.info("final, step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    metrics.close()


def _write_final(engine, out_dir: Path, tokenizer, identity: dict, step: int) -> None:
    """RUN/student/final/ via a temporary directory and a rename, so a crash never leaves half of it."""
    final = out_dir / "final"
    tmp = out_dir / f".final.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_student(engine.module, tmp, tokenizer, extra={"identity": identity, "steps": step})
    old = out_dir / f".final.old{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    log.info("student written to %s", final)
