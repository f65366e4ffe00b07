"""`mellama-jax eval score`: score a predictions.jsonl that `eval` wrote (or another system's outputs in the same
rows) again, without a model. Every row is checked before anything is scored or written; the first bad row
stops the run with its line number."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from mellama_jax.data.corpus import BadRecord
from mellama_jax.eval.report import BERTSCORE_HELP, WITH_CHOICES, score_rows, summarize, write
from mellama_jax.eval.tasks import TASKS, Task
from mellama_jax.options import option


def _check(row, task: Task, first: dict | None, where: str) -> None:
    if not isinstance(row, dict):
        raise BadRecord(f"{where}: expected a JSON object, got {type(row).__name__}")
    needed = ("task", "id", "gold", "output") + (("choices",) if task.kind in WITH_CHOICES else ())
    for key in needed:
        if key not in row:
            raise BadRecord(f"{where}: missing field {key!r}")
    if row["task"] not in TASKS:
        raise BadRecord(f"{where}: unknown task {row['task']!r}; known: {sorted(TASKS)}")
    if row["task"] != task.name:
        raise BadRecord(f"{where}: a {row['task']!r} row, but --task is {task.name!r}")
    if not isinstance(row["output"], str):
        raise BadRecord(f"{where}: 'output' is not a string")
    gold, choices = row["gold"], row.get("choices")
    if first is not None and choices != first.get("choices"):
        raise BadRecord(f"{where}: choices differ from the first row's")
    if task.kind in WITH_CHOICES and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
        raise BadRecord(f"{where}: 'choices' is not a list of strings")
    golds = gold if task.kind in ("multilabel", "extractive") else [gold]
    if (
        not isinstance(golds, list)
        or (not golds and task.kind == "extractive")
        or not all(isinstance(g, str) for g in golds)
    ):
        raise BadRecord(f"{where}: 'gold' is not what a {task.kind} task's gold is (see docs/evaluation.md)")
    if choices is not None and any(g not in choices for g in golds):
        raise BadRecord(f"{where}: gold {gold!r} is not among the choices")


def read_predictions(path: str | Path, task: Task) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such predictions file")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError:
        raise BadRecord(f"{path}: not UTF-8 text") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadRecord(f"{path}:{number}: not JSON ({e.msg})") from None
        _check(row, task, rows[0] if rows else None, f"{path}:{number}")
        rows.append(row)
    if not rows:
        raise BadRecord(f"{path}: no predictions")
    return rows


@dataclasses.dataclass(frozen=True)
class RescoreRequest:
    """One `eval score`: what `mellama-jax eval score` parses, and what `rescore` takes."""

    task: str = option(choices=sorted(TASKS))
    predictions: str | Path = option(help="a predictions.jsonl that `eval` wrote")
    out: str | Path = option(help="folder for the new predictions.jsonl, summary.json, summary.md")
    bertscore_model: str | None = option(None, BERTSCORE_HELP)


def rescore(r: RescoreRequest) -> dict:
    if r.task not in TASKS:
        raise ValueError(f"unknown task {r.task!r}; implemented: {sorted(TASKS)}")
    definition = TASKS[r.task]
    rows = read_predictions(r.predictions, definition)
    scored, metrics = score_rows(definition, rows, r.bertscore_model)
    summary = summarize(definition, metrics, {"backend": "rescored", "predictions": str(r.predictions)})
    write(
        r.out,
        [{k: v for k, v in row.items() if k != "prediction"} for row in rows],
        scored,
        summary,
        inputs=[r.predictions],
    )
    return summary
