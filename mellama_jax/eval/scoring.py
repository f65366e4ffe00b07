"""Scoring as the Me-LLaMA evaluation code does it: greedy output, prediction = the first choice (in the
task's choice order) whose string occurs in the output, lower-cased for PubMedQA; accuracy, macro-F1 over the
choices, and the share of outputs in which no choice occurs ("missing", counted as wrong)."""

from __future__ import annotations

from sklearn.metrics import f1_score


def first_choice(output: str, choices: list[str], lowercase: bool = False) -> str | None:
    text = output.lower() if lowercase else output
    for choice in choices:
        if (choice.lower() if lowercase else choice) in text:
            return choice
    return None


def classification_metrics(predictions: list[str | None], golds: list[str], choices: list[str]) -> dict:
    n = len(golds)
    if n == 0:
        raise ValueError("no examples to score")
    missing = sum(p is None for p in predictions)
    preds = [p if p is not None else "<missing>" for p in predictions]
    return {
        "accuracy": sum(p == g for p, g in zip(preds, golds)) / n,
        "macro_f1": float(f1_score(golds, preds, labels=choices, average="macro", zero_division=0)),
        "missing": missing / n,
        "examples": n,
    }
