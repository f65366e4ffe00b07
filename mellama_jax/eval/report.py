"""Prediction rows -> metrics -> predictions.jsonl, summary.json and summary.md; shared by `eval` (rows from a
model's outputs) and `eval score` (rows read back from a predictions.jsonl, no model).

A row keeps everything its score needs: task, id, gold, the raw output, and for choice and multi-label tasks
the choices in their order (the authors' scorers read the choices from each document too).
"""

from __future__ import annotations

import json
from pathlib import Path

from mellama_jax.data.corpus import BadRecord, read_json_file
from mellama_jax.eval.ner_html import ner_metrics, spans
from mellama_jax.eval.scoring import (
    METRIC_NOTES,
    classification_metrics,
    extractive_metrics,
    first_choice,
    labels_in,
    multilabel_metrics,
    single_choice,
    summary_metrics,
)
from mellama_jax.eval.tasks import Task
from mellama_jax.outputs import atomic_output

WITH_CHOICES = ("choice", "multilabel")


def make_rows(task: Task, examples, outputs: list[str], choices: list[str] | None) -> list[dict]:
    extra = {"choices": list(choices)} if task.kind in WITH_CHOICES else {}
    return [{"task": task.name, "id": e.id, "gold": e.gold, **extra, "output": o} for e, o in zip(examples, outputs)]


def rule_of(task: Task) -> str:
    """The task's scoring rule in one line, and the authors' class in vital_measure.py it follows."""
    if task.kind == "choice":
        if task.exactly_one:
            return "an answer only when exactly one choice occurs in the output, case-sensitive (DDI2013)"
        case = "lower-cased output and choices" if task.lowercase else "case kept (MedQA, MedMCQA)"
        return f"first choice, in choice order, found in the output; {case} (Classification)"
    return {
        "multilabel": "each label whose exact, case-sensitive string occurs in the output (HoC)",
        "extractive": "NormQA: whole output vs gold, normalised; character-set F1 (EmrQA, NormQA)",
        "ner": "HTML concept spans aligned to the gold's words; seqeval entities (NER)",
        "summary": "ROUGE-1/2/L without stemming; BERTScore (AbstractiveSummarization)",
    }[task.kind]


def _choice_metrics(task: Task, rows: list[dict]) -> tuple[list, dict]:
    outputs, golds = [r["output"] for r in rows], [r["gold"] for r in rows]
    if not task.exactly_one:
        predictions = [first_choice(o, r["choices"], task.lowercase) for o, r in zip(outputs, rows)]
        return predictions, classification_metrics(predictions, golds)
    predictions = [single_choice(o, r["choices"]) for o, r in zip(outputs, rows)]
    metrics = classification_metrics(predictions, golds)
    first = classification_metrics([first_choice(o, r["choices"], False) for o, r in zip(outputs, rows)], golds)
    metrics.update(first_match_accuracy=first["accuracy"], first_match_macro_f1=first["macro_f1"])
    return predictions, metrics


BERTSCORE_HELP = (
    "summaries: the local copy of bert-base-multilingual-cased, the paper's BERTScore model (else "
    "skipped; another model is reported under its own name)"
)


def score_rows(task: Task, rows: list[dict], bertscore_model: str | None = None) -> tuple[list, dict]:
    """(per-row predictions, metrics) by the task's kind."""
    if task.kind == "choice":
        return _choice_metrics(task, rows)
    outputs, golds = [r["output"] for r in rows], [r["gold"] for r in rows]
    if task.kind == "multilabel":
        predictions = [labels_in(o, r["choices"]) for o, r in zip(outputs, rows)]
        return predictions, multilabel_metrics(predictions, golds, rows[0]["choices"])
    if task.kind == "extractive":
        return [o.strip() for o in outputs], extractive_metrics(outputs, golds)
    if task.kind == "ner":
        return [spans(o) for o in outputs], ner_metrics(outputs, golds)
    return [o.strip() for o in outputs], summary_metrics(outputs, golds, bertscore_model)


def notes(metrics: dict) -> dict:
    out = {k: METRIC_NOTES[k] for k in metrics if k in METRIC_NOTES}
    out.update(
        {
            k: "BERTScore F1 with a model other than the paper's bert-base-multilingual-cased: not comparable"
            for k in metrics
            if k.startswith("bertscore_f1[")
        }
    )
    return out


def summarize(task: Task, metrics: dict, run: dict) -> dict:
    return {"task": task.name, "kind": task.kind, "rule": rule_of(task), **run, **metrics, "notes": notes(metrics)}


def overlapping_ids(overlap: str | Path, task: str) -> set[str]:
    """The ids of `task`'s examples that `prepare overlap` found sharing a window with training data (`overlap`:
    its overlap.json, or the folder holding it)."""
    overlap = Path(overlap) / "overlap.json" if Path(overlap).is_dir() else Path(overlap)
    report = read_json_file(overlap, "not an overlap.json of `prepare overlap`")
    tasks = report.get("tasks") if isinstance(report, dict) else None
    if not isinstance(tasks, dict):
        raise BadRecord(f"{overlap}: not an overlap report of `prepare overlap` (no tasks)")
    if task not in tasks:
        raise BadRecord(f"{overlap}: no task {task!r} in this overlap report (it covers {sorted(tasks)})")
    ids = tasks[task].get("overlapping_ids") if isinstance(tasks[task], dict) else None
    if not isinstance(ids, list):
        raise BadRecord(f"{overlap}: task {task!r} has no list of overlapping_ids")
    return {str(i) for i in ids}


def clean_subset(task: Task, rows: list[dict], dirty: set[str], bertscore_model: str | None = None) -> dict:
    """The metrics on the examples no training document shares a window with (Llama 2's contamination analysis
    reports them beside the full set): {"examples", "overlapping", metrics}."""
    clean = [row for row in rows if row["id"] not in dirty]
    metrics = score_rows(task, clean, bertscore_model)[1] if clean else {}
    return {"examples": len(clean), "overlapping": len(rows) - len(clean), **metrics}


def write(
    out_dir: str | Path, rows: list[dict], predictions: list, summary: dict, inputs=(), overwrite: bool = False
) -> None:
    """predictions.jsonl (each row with its prediction), summary.json and summary.md, atomically, into a new
    (or empty) folder, or over an earlier eval output with `overwrite`, overlapping none of the inputs
    (outputs.atomic_output)."""
    with atomic_output(out_dir, "eval", overwrite, inputs) as tmp:
        with open(tmp / "predictions.jsonl", "w") as f:
            for row, p in zip(rows, predictions):
                f.write(json.dumps({**row, "prediction": p}) + "\n")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
        clean = summary.get("clean")
        # the clean row holds the clean subset's figures alone: a metric it lacks (no clean example) reads "skipped"
        rows_md = [summary] + (
            [{"task": f"{summary['task']} (clean)", "backend": summary.get("backend"), **clean}] if clean else []
        )
        (tmp / "summary.md").write_text(markdown(rows_md))


RUN_KEYS = {
    "task",
    "kind",
    "rule",
    "backend",
    "model",
    "data",
    "predictions",
    "fewshot",
    "model_prompt",
    "dtype",
    "truncated_prompts",
    "max_new_tokens",
    "bertscore",
    "examples_per_s_after_first_batch",
    "notes",
}


def markdown(summaries: list[dict]) -> str:
    """One row per summary with the metrics of its kind, then what each metric is."""
    keys = [k for k, v in summaries[0].items() if k not in RUN_KEYS and not isinstance(v, dict)]
    cell = lambda v: "skipped" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
    table = (
        "| task | backend | "
        + " | ".join(keys)
        + " |\n|"
        + "---|" * (len(keys) + 2)
        + "\n"
        + "".join(
            f"| {s['task']} | {s.get('backend', '-')} | " + " | ".join(cell(s.get(k)) for k in keys) + " |\n"
            for s in summaries
        )
    )
    described = {k: v for s in summaries for k, v in s.get("notes", {}).items()}
    rules = sorted({f"- {s['task']}: {s['rule']}" for s in summaries if "rule" in s})
    return (
        table
        + ("\n" + "\n".join(rules) + "\n" if rules else "")
        + "".join(f"- `{k}`: {v}\n" for k, v in described.items())
    )
