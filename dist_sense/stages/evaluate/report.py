"""RUN/eval/report.md: the evaluation's numbers as tables, and the senses of a few ambiguous words.

Rendered from RUN/eval/metrics.json and RUN/eval/details.json alone (no model is loaded), so
`write_report(run_dir)` can redraw a report at any time. A bar chart of the downstream scores
(RUN/eval/downstream.png) is added when matplotlib is installed; without it the tables stand alone.
"""
from __future__ import annotations

import json
from pathlib import Path

from dist_sense.formats.manifest import ManifestError, atomic_write_bytes

SYSTEM_NOTES = {
    "teacher": "the teacher's continuous states",
    "teacher_senses": "the teacher's states snapped to their senses",
    "student_senses": "the distilled student, snapped to senses",
    "student_no_kd": "the student's layers without any training, continuous",
    "student_mse": "the student trained on MSE to the teacher's states, continuous",
}


def _read(path: Path, required: bool) -> dict:
    if not path.is_file():
        if required:
            raise ManifestError(f"{path}: not found; run launcher/evaluate.py first")
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: not valid JSON ({err})") from None


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.{digits}f}"
    return str(value)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


def downstream_grid(metrics: dict) -> tuple[list[str], list[str], dict]:
    """(tasks, systems, {(task, system): value}) from the downstream.<task>.<system> keys."""
    grid, tasks, systems = {}, [], []
    for key, value in metrics.items():
        if not key.startswith("downstream."):
            continue
        task, system = key[len("downstream."):].rsplit(".", 1)
        grid[task, system] = value
        tasks += [task] if task not in tasks else []
        systems += [system] if system not in systems else []
    order = list(SYSTEM_NOTES)
    systems.sort(key=lambda s: order.index(s) if s in order else len(order))
    return tasks, systems, grid


def _task_head(metrics: dict, details: dict) -> list[str]:
    """The GLUE protocol's table, first: every system through the tuned teacher's frozen head."""
    rows: dict[tuple[str, str], dict] = {}
    for key, value in metrics.items():
        if key.startswith("task."):
            task, system, measure = key[len("task."):].rsplit(".", 2)
            rows.setdefault((task, system), {})[measure] = value
    if not rows:
        return []
    note = details.get("task_head", {})
    lines = ["## Through the tuned teacher's head", "",
             f"Each system's final-layer states (snapped where the system snaps) go through the frozen pooler and "
             f"classifier of the teacher fine-tuned on the task (pooling: {note.get('pooling', 'n/a')} over the "
             f"non-special tokens, so the head reads the snapped states; split: {note.get('split', 'n/a')}, "
             f"{_fmt(note.get('examples'))} examples). ratio: accuracy over the tuned teacher's. student_tuned is "
             f"the student's architecture fine-tuned directly on the labels, read through its own fine-tuned head. "
             f"own head: a logistic regression fitted on the system's pooled states of "
             f"{_fmt(note.get('own_head_examples'))} training examples.", ""]
    lines += _table(["task", "system", "accuracy", "± stderr", "macro F1", "ratio", "own head"],
                    [[task, system, _fmt(m.get("accuracy")), _fmt(m.get("stderr")), _fmt(m.get("macro_f1")),
                      _fmt(m.get("ratio_to_teacher"), 3), _fmt(m.get("own_head_accuracy"))]
                     for (task, system), m in rows.items()])
    return lines


def _summary(metrics: dict, details: dict) -> list[str]:
    held = details.get("held_out", {})
    lines = ["## Held-out text", "",
             f"Source: `{metrics.get('eval.held_out_source')}` ({_fmt(held.get('windows'))} windows, "
             f"{_fmt(held.get('content_tokens'))} tokens, {_fmt(held.get('tokens_with_senses'))} with senses). "
             f"Similarity: {details.get('similarity', 'dot')}.", ""]
    if metrics.get("eval.held_out_is_training_corpus"):
        lines += ["**Caution:** this is the corpus the dictionary and the student were built from, so fidelity "
                  "and agreement are measured on seen text. Set `eval.corpus_path` to unseen text.", ""]
    lines += ["## Sense fidelity (teacher)", ""]
    lines += _table(["metric", "value", "meaning"], [
        ["fidelity.mean_cos", _fmt(metrics.get("fidelity.mean_cos")), "cosine of a state and its snapped sense"],
        ["fidelity.coverage", _fmt(metrics.get("fidelity.coverage")), "share of tokens with a dictionary entry"]])
    lines += ["## Sense agreement (student vs teacher)", ""]
    lines += _table(["metric", "value", "meaning"], [
        ["agreement.top1", _fmt(metrics.get("agreement.top1")), "the student picks the teacher's sense"],
        ["agreement.top5", _fmt(metrics.get("agreement.top5")), "the teacher's sense is among the student's best 5"]])
    return lines


def _downstream(metrics: dict, details: dict) -> list[str]:
    tasks, systems, grid = downstream_grid(metrics)
    lines = ["## Downstream probes", ""]
    if not tasks:
        return lines + ["No probe tasks or WiC pairs were configured (`eval.probe_tasks`, `eval.wic_path`).", ""]
    lines += ["Sentence tasks: accuracy of a logistic regression on mean-pooled embeddings (5-fold cross-validation). "
              "wic: ROC AUC of the cosine between the word's embeddings in two sentences.", ""]
    lines += _table(["task"] + systems, [[task] + [_fmt(grid.get((task, s))) for s in systems] for task in tasks])
    lines += [f"- **{s}**: {SYSTEM_NOTES.get(s, '')}" for s in systems]
    lines += [f"- {system} is n/a: {reason}" for system, reason in details.get("skipped", {}).items()]
    return lines + [""]


def _snapping(metrics: dict) -> list[str]:
    """The teacher's senses under each snapping similarity (snapping.<task>.<similarity>)."""
    grid, tasks, sims = {}, [], []
    for key, value in metrics.items():
        if key.startswith("snapping."):
            task, sim = key[len("snapping."):].rsplit(".", 1)
            grid[task, sim] = value
            tasks += [task] if task not in tasks else []
            sims += [sim] if sim not in sims else []
    if not tasks:
        return []
    lines = ["## Snapping similarity", "", "`teacher_senses` with the teacher's states snapped by each similarity "
             "(`eval.similarity` and `label.similarity` choose one; the downstream table uses "
             f"`{metrics.get('eval.similarity', 'the configured one')}`).", ""]
    return lines + _table(["task"] + sims, [[task] + [_fmt(grid.get((task, s))) for s in sims] for task in tasks])


def _size_speed(metrics: dict) -> list[str]:
    teacher, student = metrics.get("size.teacher_params"), metrics.get("size.student_params")
    ratio = student / teacher if teacher and student else None
    dict_bytes = metrics.get("size.dictionary_bytes") or 0
    lines = ["## Size", ""]
    lines += _table(["teacher parameters", "student parameters", "student / teacher", "dictionary"], [[
        _fmt(teacher), _fmt(student), _fmt(ratio, 3), f"{_fmt(dict_bytes)} bytes ({dict_bytes / 2**20:.2f} MiB)"]])
    fast, slow = metrics.get("speed.student_tokens_per_s"), metrics.get("speed.teacher_tokens_per_s")
    lines += ["## Speed", "", "Tokens per second through `SenseEncoder.encode` (snapping included) over the same "
              "held-out batches, the first (warm-up) batch excluded.", ""]
    lines += _table(["teacher tokens/s", "student tokens/s", "speedup (student / teacher)"],
                    [[_fmt(slow), _fmt(fast), f"{fast / slow:.2f}x" if fast and slow else "n/a"]])
    return lines


def _pictures(details: dict) -> list[str]:
    figures = details.get("figures") or {}
    lines = ["## Senses in pictures", ""]
    if figures.get("senses_png"):
        lines += [f"Occurrences of {', '.join(figures.get('plotted_words', []))} in a 2-D projection (PCA), "
                  "coloured by the sense the teacher's state snaps to; crosses are the sense centres.", "",
                  f"![senses]({figures['senses_png']})", ""]
    else:
        lines += ["(No picture: matplotlib is not installed, or no ambiguous word occurs often enough.)", ""]
    if figures.get("projector"):
        lines += [f"Every sense centre, labelled with its token, count and an example context, is in TensorBoard's "
                  f"projector: `tensorboard --logdir {figures['projector']}` (Projector tab).", ""]
    return lines


def _words(details: dict) -> list[str]:
    entries = details.get("words", [])
    lines = ["## Senses of ambiguous words", ""]
    if not entries:
        return lines + ["No ambiguous words to show.", ""]
    for entry in entries:
        senses = entry.get("senses", [])
        lines += [f"### {entry.get('word')} (token `{entry.get('token')}`, {len(senses)} senses)", ""]
        if not senses:
            lines += ["No dictionary entry.", ""]
            continue
        lines += _table(["sense", "count", "example contexts"],
                        [[s["sense"], _fmt(s["count"]), " / ".join(s.get("examples", [])) or "-"] for s in senses])
    return lines


def _plot(metrics: dict, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        out.unlink(missing_ok=True)
        return ["(No plot: matplotlib is not installed.)", ""]
    tasks, systems, grid = downstream_grid(metrics)
    if not tasks:
        return []
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(tasks), 3.5))
    width = 0.8 / max(len(systems), 1)
    for i, system in enumerate(systems):
        values = [grid.get((t, system)) or 0.0 for t in tasks]
        ax.bar([t + i * width for t in range(len(tasks))], values, width, label=system)
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy / AUC")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return [f"![downstream scores]({out.name})", ""]


def write_report(run_dir) -> Path:
    """Render RUN/eval/report.md from RUN/eval/metrics.json (and details.json); returns its path."""
    eval_dir = Path(run_dir) / "eval"
    metrics = _read(eval_dir / "metrics.json", required=True)
    details = _read(eval_dir / "details.json", required=False)
    lines = [f"# Evaluation of {details.get('run_dir', Path(run_dir))}", ""]
    lines += _task_head(metrics, details) + _summary(metrics, details) + _downstream(metrics, details) + _plot(metrics, eval_dir / "downstream.png")
    lines += _snapping(metrics) + _size_speed(metrics) + _pictures(details) + _words(details)
    return atomic_write_bytes(eval_dir / "report.md", "\n".join(lines).rstrip().encode() + b"\n")
