"""Scoring by the Me-LLaMA authors' rules (BIDS-Xu-Lab/Me-LLaMA @ 08c893f2, src/tasks/vital_measure.py), with
the metric libraries doing the arithmetic. docs/evaluation.md lists, per task, the rule and the authors' class
it follows. i2b2's HTML scoring is in ner_html.py.

Where the authors' rule is a quirk, its number is the paper-comparable headline and a standard metric is
reported beside it under its own name (METRIC_NOTES says which is which).
"""

from __future__ import annotations

import collections
import re
import string
from pathlib import Path

import numpy as np

MISSING = "missing"  # the authors' prediction when no choice is found; counted wrong, never a label

METRIC_NOTES = {
    "accuracy": "share of examples whose prediction equals the gold (Me-LLaMA rule; paper-comparable)",
    "macro_f1": "scikit-learn macro F1 over the labels present in the gold answers (Me-LLaMA; paper-comparable)",
    "weighted_f1": "scikit-learn weighted F1 over the gold labels (the authors' 'f1')",
    "missing": "share of outputs in which the rule found no answer (counted wrong)",
    "first_match_accuracy": "standard: the first choice found (case-sensitive), without DDI's exactly-one rule",
    "first_match_macro_f1": "standard: macro F1 of the first-match predictions, over the gold labels",
    "label_f1": "per label: binary F1 of the label's presence (Me-LLaMA HoC)",
    "exact_set_accuracy": "share of examples whose predicted label set equals the gold set",
    "exact_match": "Me-LLaMA NormQA: normalised output equals the normalised gold (paper-comparable)",
    "f1": "Me-LLaMA NormQA: set-overlap F1 of characters, whole output vs gold (paper-comparable quirk)",
    "squad_exact_match": "standard: SQuAD exact match of the whole output, best over the gold answers",
    "squad_f1": "standard: SQuAD token F1 of the whole output, best over the gold answers",
    "entity_f1": "seqeval entity F1 after HTML spans are aligned to the gold's tokens (Me-LLaMA NER)",
    "rouge1": "ROUGE-1 F, rouge-score without stemming, mean over examples",
    "rouge2": "ROUGE-2 F, rouge-score without stemming, mean over examples",
    "rougeL": "ROUGE-L F, rouge-score without stemming, mean over examples",
    "bertscore_f1": "BERTScore F1 with bert-base-multilingual-cased at layer 9, no idf, no rescaling (paper's)",
}


def _count(golds) -> int:
    if not golds:
        raise ValueError("no examples to score")
    return len(golds)


# ------------------------------------------------------------------------------------------ multiple choice


def first_choice(output: str, choices: list[str], lowercase: bool = True) -> str | None:
    """The first choice, in choice order, whose string occurs in the output; output and choices lower-cased
    unless the task turns it off (the authors' Classification.LOWER_CASE, False only for MedQA/MedMCQA)."""
    text = output.strip().lower() if lowercase else output.strip()
    return next((c for c in choices if (c.lower() if lowercase else c) in text), None)


def single_choice(output: str, choices: list[str]) -> str | None:
    """DDI's rule: case-sensitive, and an answer only when exactly one choice string occurs in the output."""
    found = [c for c in choices if c in output.strip()]
    return found[0] if len(found) == 1 else None


def label_f1(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Each label's binary F1 from boolean (examples, labels) arrays: 2 tp / (2 tp + fp + fn), and 0 for a label
    neither gold nor predicted: scikit-learn's f1_score with zero_division=0, which the authors call (written out
    here because importing scikit-learn cost 1.2 s of every eval's start; tests check it against scikit-learn)."""
    tp = np.sum(truth & pred, axis=0)
    wrong = np.sum(truth ^ pred, axis=0)
    return 2 * tp / np.maximum(2 * tp + wrong, 1)  # 0 where tp is 0, including the 0 / 0 case


def classification_metrics(predictions: list[str | None], golds: list[str]) -> dict:
    """Accuracy, and F1 averaged over the labels present in the gold answers (the authors pass
    labels=set(golds) to scikit-learn): a choice that is never the gold answer adds no zero to the mean."""
    n = _count(golds)
    preds = [MISSING if p is None else p for p in predictions]
    labels = np.array(sorted(set(golds)), dtype=object)
    truth = np.array(golds, dtype=object)[:, None] == labels
    per_label = label_f1(truth, np.array(preds, dtype=object)[:, None] == labels)
    support = truth.sum(axis=0)  # every label occurs in the golds: no zero weights
    return {
        "accuracy": sum(p == g for p, g in zip(preds, golds)) / n,
        "macro_f1": float(np.mean(per_label)),
        "weighted_f1": float(np.sum(per_label * support) / np.sum(support)),
        "missing": sum(p is None for p in predictions) / n,
        "examples": n,
    }


# ------------------------------------------------------------------------------------------- multi-label


def labels_in(output: str, labels: list[str]) -> list[str]:
    """HoC: each label whose exact (case-sensitive) string occurs in the output."""
    text = output.strip()
    return [label for label in labels if label in text]


def multilabel_metrics(predictions: list[list[str]], golds: list[list[str]], labels: list[str]) -> dict:
    """Macro F1 over all labels (presence per label, as the authors' HoC scorer) and each label's binary F1."""
    n = _count(golds)
    truth = np.array([[label in g for label in labels] for g in golds])
    pred = np.array([[label in p for label in labels] for p in predictions])
    per_label = label_f1(truth, pred)
    return {
        "macro_f1": float(np.mean(per_label)),
        "exact_set_accuracy": float(np.mean(np.all(truth == pred, axis=1))),
        "missing": sum(not p for p in predictions) / n,
        "label_f1": {label: float(f) for label, f in zip(labels, per_label)},
        "examples": n,
    }


# ---------------------------------------------------------------------------------------- extractive QA


def normqa_normalize(text: str) -> str:
    """The authors' NormQA normalisation: lower case, punctuation dropped, and every remaining character
    separated by a space (their punctuation step joins characters with spaces), so tokens are characters."""
    kept = [ch for ch in text.lower() if ch not in string.punctuation]
    return " ".join(" ".join(kept).split())


def normqa_f1(output: str, gold: str) -> float:
    """NormQA F1: the *set* of shared tokens (characters) over the token counts of each side."""
    pred, ref = normqa_normalize(output).split(), normqa_normalize(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = len(set(pred) & set(ref))
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_normalize(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def squad_f1(prediction: str, gold: str) -> float:
    pred, ref = squad_normalize(prediction).split(), squad_normalize(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def extractive_metrics(outputs: list[str], golds: list[list[str]]) -> dict:
    """The authors' NormQA on the whole output against the (first) gold answer, and SQuAD's EM/F1 beside it."""
    n = _count(golds)
    em = [normqa_normalize(o) == normqa_normalize(gs[0]) for o, gs in zip(outputs, golds)]
    f1 = [normqa_f1(o, gs[0]) for o, gs in zip(outputs, golds)]
    squad_em = [max(squad_normalize(o) == squad_normalize(g) for g in gs) for o, gs in zip(outputs, golds)]
    squad = [max(squad_f1(o, g) for g in gs) for o, gs in zip(outputs, golds)]
    return {
        "exact_match": sum(em) / n,
        "f1": sum(f1) / n,
        "squad_exact_match": sum(squad_em) / n,
        "squad_f1": sum(squad) / n,
        "examples": n,
    }


# ---------------------------------------------------------------------------------------------- summaries


def rouge(predictions: list[str], references: list[str]) -> dict:
    """ROUGE-1/2/L F as the `evaluate` library computes them: rouge-score's tokenizer, no stemming. evaluate
    reports the median of 1000 unseeded bootstrap means; we report the mean itself (what that estimates)."""
    from rouge_score import rouge_scorer  # here, not at the top: it imports NLTK (a second); summaries only

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
    return {name: float(np.mean([s[name].fmeasure for s in scores])) for name in ("rouge1", "rouge2", "rougeL")}


def summary_metrics(predictions: list[str], references: list[str], bertscore_model: str | None = None) -> dict:
    n = _count(references)
    return {**rouge(predictions, references), **bertscore(predictions, references, bertscore_model), "examples": n}


PAPER_BERTSCORE = "bert-base-multilingual-cased"


def bertscore_identity(config, model_dir: str | Path) -> tuple[str | None, int]:
    """(name, layer) of a local BERTScore model: the paper's bert-base-multilingual-cased (recognised by its
    architecture: BERT, 119,547-piece vocabulary, 12 layers) gets bert-score's default layer for it (9) and
    name None; any other model is named by its directory and scored at bert-score's layer for that name, else
    its last layer."""
    from bert_score.utils import model2layers  # the interop extra, checked by bertscore before this

    if (
        getattr(config, "model_type", None) == "bert"
        and getattr(config, "vocab_size", None) == 119547
        and getattr(config, "num_hidden_layers", None) == 12
    ):
        return None, model2layers[PAPER_BERTSCORE]
    name = Path(model_dir).resolve().name
    return name, model2layers.get(name, config.num_hidden_layers)


def bertscore(predictions: list[str], references: list[str], model: str | None) -> dict:
    """BERTScore F1 (no idf, no baseline rescaling) with a local model directory; skipped (never zero) when
    there is none. A model other than the paper's is reported under its own key, bertscore_f1[NAME]."""
    if not model or not Path(model).is_dir():
        why = "no local BERTScore model given (--bertscore-model DIR)" if not model else f"{model} is not a directory"
        return {"bertscore_f1": None, "bertscore": f"skipped: {why}"}
    try:
        from bert_score import score
        from transformers import AutoConfig
    except ImportError as e:
        return {"bertscore_f1": None, "bertscore": f"skipped: {e}"}
    name, layer = bertscore_identity(AutoConfig.from_pretrained(model), model)
    _, _, f1 = score(
        predictions,
        references,
        model_type=str(model),
        num_layers=layer,
        idf=False,
        rescale_with_baseline=False,
        verbose=False,
    )
    key = "bertscore_f1" if name is None else f"bertscore_f1[{name}]"
    return {key: float(f1.mean()), "bertscore": f"{name or PAPER_BERTSCORE} at layer {layer} ({model})"}
