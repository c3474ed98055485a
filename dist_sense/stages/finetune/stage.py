"""The GLUE setting's first stage: fine-tune the teacher on a labelled task under DeepSpeed ZeRO-2.

Inputs: finetune.teacher (else model.teacher: the base teacher) and the task files (task.*).
With finetune.backbone=student the same stage trains the baseline a user compares the sense
student with: the distilled student's architecture and starting weights (distill.init from
model.teacher, distill.freeze_embeddings), a fresh head, cross-entropy on the labels, and
distill's steps, warm-up, batch sizes and optimizer values, so it gets the budget the sense
student got (`effective_config`); its output is RUN/student_tuned/.
Output: RUN/teacher_tuned/ (or finetune.output):
  checkpoints/stepN/   DeepSpeed checkpoints (every finetune.save_every steps and at the end); client
                       state: data position, every rank's RNG state, the run identity
  metrics.jsonl        one JSON line per step and per evaluation (rank 0)
  identity.json        what the output was made from (stages/guard.py)
  final/               the tuned teacher (model/classifier.py: save_task_model), written to a
                       temporary name and renamed: a model folder to use as model.teacher, whose
                       frozen head judges every system's (snapped) final-layer states
The loss is cross-entropy of the head's logits on the train split; validation accuracy is logged
every finetune.eval_every steps. A rerun resumes from the newest checkpoint that loads on every rank
(stages/distill/checkpoints.py); SIGTERM stops the run at the next step with a checkpoint and exit
code 3 (stages/distill/stopping.py). Batch sizes come from finetune.* (`FinetuneConfig.batch_split`).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import torch

from dist_sense import comm
from dist_sense.config import ConfigError, RunConfig
from dist_sense.formats.identity import file_digest
from dist_sense.formats.tasks import collate, encode_split, load_task, task_fingerprints
from dist_sense.model.classifier import HEAD_INFO, build_student_task_model, build_task_model, save_task_model
from dist_sense.model.teacher import check_fits, load_tokenizer, position_limit, resolve_model_path, teacher_fingerprint
from dist_sense.runtime.faults import crash_point
from dist_sense.stages.distill.checkpoints import latest_tag, resume, save_checkpoint, seed_everything
from dist_sense.stages.distill.stopping import StopOnSignal, stopped
from dist_sense.stages.engine import start_engine
from dist_sense.stages.finetune.data import TaskBatches
from dist_sense.stages.finetune.train import MetricsLog, engine_config, evaluate, train_step
from dist_sense.stages.guard import open_stage

log = comm.get_logger("dist_sense.finetune")

OPERATIONAL_KEYS = ("eval_every", "save_every", "output")
"""finetune keys that change how often the run reports and saves, or where, not the weights it ends with."""
CHECK_EXAMPLES = 8
"""Validation examples whose logits final/task_head_check.safetensors keeps, to check a reload against."""


def tuned_dir(cfg: RunConfig) -> Path:
    """RUN/teacher_tuned (RUN/student_tuned for backbone=student), or finetune.output."""
    if cfg.finetune.output:
        return Path(cfg.finetune.output)
    return cfg.run_path / ("student_tuned" if cfg.finetune.backbone == "student" else "teacher_tuned")


def effective_config(cfg: RunConfig) -> RunConfig:
    """The config the stage runs on. backbone=teacher: model.teacher is finetune.teacher when set (the base
    to tune). backbone=student: finetune's steps, warm-up, batch sizes, lr and weight decay are distill's."""
    if cfg.finetune.backbone == "student":
        taken = {k: getattr(cfg.distill, k) for k in ("steps", "warmup_steps", "global_batch_size",
                                                      "micro_batch_size", "lr", "weight_decay")}
        return replace(cfg, finetune=replace(cfg.finetune, **taken))
    if cfg.finetune.teacher:
        return replace(cfg, model=replace(cfg.model, teacher=cfg.finetune.teacher))
    return cfg


def run_identity(cfg: RunConfig) -> dict:
    """What the tuned teacher depends on: the base teacher's files, the task files' content, the task
    fields, every finetune setting that changes the weights, and the engine config's content."""
    model_path = resolve_model_path(cfg.model.teacher)
    tokenizer_path = resolve_model_path(cfg.model.tokenizer or cfg.model.teacher)
    task = {k: v for k, v in asdict(cfg.task).items() if k not in ("train", "validation", "test")}
    settings = {k: v for k, v in asdict(cfg.finetune).items() if k not in OPERATIONAL_KEYS}
    engine = Path(cfg.finetune.ds_config)
    settings["ds_config"] = file_digest(engine) if engine.is_file() else cfg.finetune.ds_config
    identity = {"teacher_fingerprint": teacher_fingerprint(model_path, tokenizer_path),
                "task_fingerprints": task_fingerprints(cfg.task), "task": task, "finetune": settings}
    if cfg.finetune.backbone == "student":  # what the student is made of
        identity["student"] = {k: getattr(cfg.distill, k) for k in ("init", "layers", "student_model",
                                                                    "freeze_embeddings", "seed")}
    return identity


def prepare(cfg: RunConfig, env) -> dict:
    """Every check before the stage's output is opened: task files, tokenizer against teacher, lengths,
    batches (needs no process group: `env` is comm.detect()'s)."""
    from transformers import AutoConfig

    task = load_task(cfg.task)
    tokenizer = load_tokenizer(cfg.model)
    model_path = resolve_model_path(cfg.model.teacher)
    hf_config = AutoConfig.from_pretrained(model_path)
    check_fits(hf_config, tokenizer, model_path, resolve_model_path(cfg.model.tokenizer or cfg.model.teacher))
    limit = position_limit(hf_config)
    if limit is not None and cfg.finetune.max_length > limit:
        raise ConfigError(f"finetune.max_length={cfg.finetune.max_length} is beyond the {limit} positions of "
                          f"model {model_path} (max_position_embeddings): set finetune.max_length to at most {limit}")
    micro, accum = cfg.finetune.batch_split(env.world_size)
    encoded = {name: encode_split(split, tokenizer, cfg.finetune.max_length) for name, split in task.splits.items()}
    for name, split in encoded.items():
        if split.truncated:
            log.info("%s: %d of %d examples cut to finetune.max_length=%d", task.splits[name].path, split.truncated,
                     len(split), cfg.finetune.max_length)
    pad_id = tokenizer.pad_token_id or 0
    data = TaskBatches(encoded["train"], task.splits["train"].path, env.rank, env.world_size, micro,
                       cfg.finetune.global_batch_size, seed=cfg.finetune.seed, pad_id=pad_id,
                       group_steps=cfg.finetune.group_by_length)
    return {"task": task, "tokenizer": tokenizer, "encoded": encoded, "data": data, "micro": micro, "accum": accum,
            "identity": run_identity(cfg), "pad_id": pad_id}


def run(cfg: RunConfig, restart: bool = False) -> Path:
    """Fine-tune the teacher into OUTPUT/final (resuming from the newest checkpoint) and return that folder.

    On SIGTERM: a checkpoint at the next step, then SystemExit(3) on every rank.
    restart: move an output made from another teacher, task or settings aside instead of refusing."""
    cfg = effective_config(cfg)
    with StopOnSignal() as stop:  # installed before the (slow) start, so an early signal stops cleanly too
        env = comm.init_torch()
        plan = prepare(cfg, env)
        out_dir = tuned_dir(cfg)
        with open_stage(cfg, "finetune", out_dir, plan["identity"], restart=restart, rank=env.rank,
                        share=comm.broadcast_object) as stage:
            if stage.resumed and (out_dir / "final" / HEAD_INFO).is_file():
                log.info("%s is complete for these settings; nothing to do", out_dir / "final")
                return out_dir / "final"
            stage.begin()
            return _run(cfg, env, plan, out_dir, stop)


def _run(cfg: RunConfig, env, plan: dict, out_dir: Path, stop: StopOnSignal) -> Path:
    task = plan["task"]
    seed_everything(cfg.finetune.seed)  # the same head on every rank
    if cfg.finetune.backbone == "student":
        model = _student_task_model(cfg, plan)
    else:
        model = build_task_model(cfg.model.teacher, task.labels, cfg.finetune.pooling, info={"task": task.name})
        if cfg.finetune.freeze_embeddings:
            model.backbone.get_input_embeddings().requires_grad_(False)
    engine = _initialize(cfg, model, plan)
    seed_everything(cfg.finetune.seed + 1000 * (env.rank + 1))  # dropout differs by rank
    data = plan["data"]
    ckpt_dir = out_dir / "checkpoints"
    step = resume(engine, ckpt_dir, plan["identity"], data)
    results = _train(cfg, engine, data, plan, out_dir, step, stop)
    if env.is_main:
        _write_final(cfg, engine, out_dir, plan, results)
    comm.barrier()
    return out_dir / "final"


def _student_task_model(cfg: RunConfig, plan: dict):
    """The distilled student's architecture and starting weights (as the distill stage builds it) with a head."""
    from transformers import AutoConfig

    from dist_sense.model.student import build_student, check_vocabulary

    d = int(AutoConfig.from_pretrained(resolve_model_path(cfg.model.teacher)).hidden_size)
    seed_everything(cfg.distill.seed)  # the distill stage's starting student (init=model: the same random weights)
    student = build_student(cfg, d)
    check_vocabulary(student, plan["tokenizer"])
    if cfg.distill.freeze_embeddings:  # the same parameters trained as in distillation
        student.backbone.get_input_embeddings().requires_grad_(False)
    seed_everything(cfg.finetune.seed)
    return build_student_task_model(student, plan["task"].labels, cfg.finetune.pooling,
                                    info={"task": plan["task"].name, "backbone": "student"})


def _initialize(cfg: RunConfig, model, plan: dict):
    engine, trained = start_engine(model, cfg.finetune, engine_config(cfg, plan["micro"], plan["accum"]))
    log.info("fine-tuning %s on %s (%d classes, %d train examples): %d parameters trained; micro batch %d x %d "
             "ranks x %d accumulation = %d examples per step",
             model.head.info.get("base_teacher") or f"the student ({model.head.info.get('base_student')})",
             plan["task"].name, plan["task"].n_classes, len(plan["encoded"]["train"]), trained, plan["micro"],
             comm.detect().world_size, plan["accum"], cfg.finetune.global_batch_size)
    return engine


def _train(cfg: RunConfig, engine, data: TaskBatches, plan: dict, out_dir: Path, step: int,
           stop: StopOnSignal) -> dict:
    """Train from `step` to finetune.steps; return the final held-out results (validation, test)."""
    metrics = MetricsLog(cfg, out_dir, step)
    ckpt_dir, every_eval, every_save = out_dir / "checkpoints", cfg.finetune.eval_every, cfg.finetune.save_every
    held_out = {"eval": plan["encoded"]["validation"], "test": plan["encoded"].get("test")}
    # from_pretrained hands the backbone over in eval mode: without this a resumed run (no step-0
    # evaluation, which ends in train()) would train without dropout and drift from an uninterrupted one.
    engine.module.train()
    if step == 0 and every_eval and (result := evaluate(engine, held_out["eval"], plan["micro"], plan["pad_id"])):
        metrics.write(0, result)  # the starting point, for comparison
    saved_at = step
    while step < cfg.finetune.steps:
        lr = engine.get_lr()[0]  # the rate this step uses
        stats = train_step(engine, data, plan["accum"], stop)
        step = int(engine.global_steps)
        crash_point("finetune.step")
        metrics.train(step, stats, lr, engine.get_global_grad_norm())
        if every_eval and step % every_eval == 0 and step < cfg.finetune.steps:
            if result := evaluate(engine, held_out["eval"], plan["micro"], plan["pad_id"]):
                metrics.write(step, result)
                log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        if every_save and step % every_save == 0:
            save_checkpoint(engine, ckpt_dir, step, data, plan["identity"])
            saved_at = step
        if stats["stop"] and step < cfg.finetune.steps:  # every rank sees the same count at the same step
            if saved_at != step:
                save_checkpoint(engine, ckpt_dir, step, data, plan["identity"])
            metrics.close()
            raise stopped(step, stats["stop"])
    if saved_at != step or latest_tag(ckpt_dir) is None:
        save_checkpoint(engine, ckpt_dir, step, data, plan["identity"])
    results = {}
    for prefix, encoded in held_out.items():
        if result := evaluate(engine, encoded, plan["micro"], plan["pad_id"], prefix=prefix):
            metrics.write(step, result)
            results.update(result)
    log.info("final, step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    metrics.close()
    return results


@torch.no_grad()
def reference_logits(module, encoded, pad_id: int, device) -> dict:
    """The first CHECK_EXAMPLES validation examples and the logits `module` (in eval mode) gives them."""
    batch = collate(encoded, range(min(CHECK_EXAMPLES, len(encoded))), pad_id)
    was_training = module.training
    module.eval()
    logits = module(*(batch[k].to(device) for k in ("input_ids", "attention_mask", "special_mask")))
    module.train(was_training)
    return {**{k: batch[k] for k in ("input_ids", "attention_mask", "special_mask", "labels")}, "logits": logits}


def _write_final(cfg: RunConfig, engine, out_dir: Path, plan: dict, results: dict) -> None:
    """OUTPUT/final/ via a temporary folder and a rename, so a crash never leaves half of it."""
    final, tmp, old = out_dir / "final", out_dir / f".final.tmp{os.getpid()}", out_dir / f".final.old{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    check = reference_logits(engine.module, plan["encoded"]["validation"], plan["pad_id"], engine.device)
    extra = {"task": plan["task"].name, "steps": int(engine.global_steps), "identity": plan["identity"],
             "backbone": cfg.finetune.backbone,
             "accuracy": {k.split("/")[0].replace("eval", "validation"): v for k, v in results.items()
                          if k.endswith("/accuracy")}}
    save_task_model(engine.module, tmp, plan["tokenizer"], extra=extra, check=check)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    log.info("tuned %s written to %s (validation accuracy %s)", cfg.finetune.backbone, final,
             extra["accuracy"].get("validation"))
