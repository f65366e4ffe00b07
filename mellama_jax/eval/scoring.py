"""Scoring as the Me-LLaMA evaluation scored, with the metric libraries doing the arithmetic.

- choice: the prediction is the first choice (in the task's choice order) whose string occurs in the output,
  lower-cased for PubMedQA; accuracy, macro-F1 over the choices (scikit-learn), and "missing" (no choice
  found; counted as wrong).
- multilabel (HoC): each label is predicted when its string occurs in the output; label-wise macro-F1.
- extractive (EmrQA): SQuAD-normalised exact match and token F1, best over the gold answers.
- ner (i2b2): the output's "text: type" lines mapped back onto the sentence's tokens as BIO tags, then
  entity-level precision/recall/F1 (seqeval).
- summary: ROUGE-1/2/L F-measure (rouge-score, stemmed); BERTScore F1 when its model is available locally,
  otherwise reported as skipped.
"""

from __future__ import annotations

import collections
import re
import string
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score


def first_choice(output: str, choices: list[str], lowercase: bool = False) -> str | None:
    text = output.lower() if lowercase else output
    for choice in choices:
        if (choice.lower() if lowercase else choice) in text:
            return choice
    return None


def classification_metrics(predictions: list[str | None], golds: list[str], choices: list[str]) -> dict:
    n = _count(golds)
    preds = [p if p is not None else "<missing>" for p in predictions]
    return {
        "accuracy": sum(p == g for p, g in zip(preds, golds)) / n,
        "macro_f1": float(f1_score(golds, preds, labels=choices, average="macro", zero_division=0)),
        "missing": sum(p is None for p in predictions) / n,
        "examples": n,
    }


def _count(golds) -> int:
    if not golds:
        raise ValueError("no examples to score")
    return len(golds)


# ------------------------------------------------------------------------------------------ multi-label


def labels_in(output: str, labels: list[str]) -> list[str]:
    text = output.lower()
    return [label for label in labels if label.lower() in text]


def multilabel_metrics(predictions: list[list[str]], golds: list[list[str]], labels: list[str]) -> dict:
    n = _count(golds)
    truth = np.array([[label in g for label in labels] for g in golds])
    pred = np.array([[label in p for label in labels] for p in predictions])
    return {
        "macro_f1": float(f1_score(truth, pred, average="macro", zero_division=0)),
        "accuracy": float(np.mean(np.all(truth == pred, axis=1))),  # exact set match
        "missing": sum(not p for p in predictions) / n,
        "examples": n,
    }


# ---------------------------------------------------------------------------------------- extractive QA


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if not pred or not ref:
        return float(pred == ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def extractive_metrics(predictions: list[str], golds: list[list[str]]) -> dict:
    n = _count(golds)
    em = [max(normalize_answer(p) == normalize_answer(g) for g in gs) for p, gs in zip(predictions, golds)]
    f1 = [max(token_f1(p, g) for g in gs) for p, gs in zip(predictions, golds)]
    return {"exact_match": sum(em) / n, "f1": sum(f1) / n, "examples": n}


# -------------------------------------------------------------------------------------------------- NER


def _clean(text: str) -> str:
    return text.strip().strip("'\"`*-•").strip()


def tags_from_output(output: str, tokens: list[str], types: list[str]) -> list[str]:
    """BIO tags for `tokens` from lines "entity text: type" (also "type: entity text"). Each entity is placed
    at its first case-insensitive token match that is not yet tagged; lines naming no known type, or text
    not in the sentence, are ignored (they cost recall, as a missed entity does)."""
    by_name = {t.lower(): t for t in types}
    lowered = [t.lower() for t in tokens]
    tags = ["O"] * len(tokens)
    for line in output.splitlines():
        if ":" not in line:
            continue
        left, right = (_clean(x) for x in line.rsplit(":", 1))
        if right.lower() in by_name:
            span, kind = left, by_name[right.lower()]
        elif left.lower() in by_name:
            span, kind = right, by_name[left.lower()]
        else:
            continue
        words = span.lower().split()
        for start in range(len(tokens) - len(words) + 1 if words else 0):
            if lowered[start:start + len(words)] == words and all(t == "O" for t in tags[start:start + len(words)]):
                tags[start:start + len(words)] = [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
                break
    return tags


def ner_metrics(predicted_tags: list[list[str]], gold_tags: list[list[str]]) -> dict:
    from seqeval.metrics import f1_score as entity_f1
    from seqeval.metrics import precision_score, recall_score

    n = _count(gold_tags)
    return {"entity_f1": float(entity_f1(gold_tags, predicted_tags, zero_division=0)),
            "entity_precision": float(precision_score(gold_tags, predicted_tags, zero_division=0)),
            "entity_recall": float(recall_score(gold_tags, predicted_tags, zero_division=0)),
            "examples": n}


# ---------------------------------------------------------------------------------------------- summaries


def summary_metrics(predictions: list[str], references: list[str], bertscore_model: str | None = None) -> dict:
    from rouge_score import rouge_scorer

    n = _count(references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
    out = {name: float(np.mean([s[name].fmeasure for s in scores])) for name in ("rouge1", "rouge2", "rougeL")}
    out.update(bertscore(predictions, references, bertscore_model))
    out["examples"] = n
    return out


def bertscore(predictions: list[str], references: list[str], model: str | None) -> dict:
    """BERTScore F1 with a local model directory; skipped (never zero) when there is none."""
    if not model or not Path(model).is_dir():
        why = "no local BERTScore model given (--bertscore-model DIR)" if not model else f"{model} is not a directory"
        return {"bertscore_f1": None, "bertscore": f"skipped: {why}"}
    try:
        from bert_score import score
        from transformers import AutoConfig
    except ImportError as e:
        return {"bertscore_f1": None, "bertscore": f"skipped: {e}"}
    layers = AutoConfig.from_pretrained(model).num_hidden_layers
    _, _, f1 = score(predictions, references, model_type=str(model), num_layers=layers, verbose=False)
    return {"bertscore_f1": float(f1.mean()), "bertscore": f"{model} (layer {layers})"}
