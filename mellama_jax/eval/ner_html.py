"""i2b2 concept extraction scored as the Me-LLaMA authors scored NER (vital_measure.py, class NER): the output
and the gold are HTML in which concepts are `<span class="problem|treatment|test|drug">`; both are read into
(word, BIO tag) sequences, the prediction is aligned to the gold's words, and seqeval scores entities.

Reading, as theirs: only the document's top-level nodes count. Text between them is split on whitespace (all
"O"); a top-level element's whole text (nested elements included) is tokenised by spaCy's English tokenizer
and tagged B-/I- with the element's first class when that class is one of the four types, else "O". An
unclosed span runs to the end of the output; a stray closing tag is ignored (BeautifulSoup's html.parser).
The authors loaded spaCy's en_core_web_lg, a download that is not on PyPI; only its tokenizer is used here, and
`spacy.blank("en")` builds the same English tokenizer rules without the download.
"""

from __future__ import annotations

import functools
import html

ENTITY_TYPES = ("problem", "treatment", "test", "drug")


@functools.lru_cache(maxsize=1)
def _tokenizer():
    try:
        import spacy
    except ImportError:
        raise ValueError("i2b2 scoring needs spaCy and beautifulsoup4: pip install 'mellama-jax[interop]'") from None
    return spacy.blank("en").tokenizer


def _soup(text: str):
    try:
        from bs4 import BeautifulSoup
    except ImportError:
        raise ValueError("i2b2 scoring needs spaCy and beautifulsoup4: pip install 'mellama-jax[interop]'") from None
    return BeautifulSoup(text, "html.parser")


def read_html(text: str) -> list[tuple[str, str]]:
    """(word, BIO tag) for each word of an HTML-tagged sentence, by the rules in the module docstring."""
    from bs4 import NavigableString  # the interop extra, checked by _soup

    tokenize, words = _tokenizer(), []
    for node in _soup(text).children:
        if isinstance(node, NavigableString):
            words += [(w, "O") for w in node.split()]
            continue
        classes = node.get("class") or ["O"]
        kind = classes[0] if classes[0] in ENTITY_TYPES else None
        for i, token in enumerate(tokenize(node.get_text())):
            words.append((token.text, "O" if kind is None else f"{'B' if i == 0 else 'I'}-{kind}"))
    return words


def spans(text: str) -> list[tuple[str, str]]:
    """(text, type) of each top-level concept span: what predictions.jsonl shows as the prediction."""
    return [
        (node.get_text(), node.get("class")[0])
        for node in _soup(text).children
        if hasattr(node, "get") and (node.get("class") or [None])[0] in ENTITY_TYPES
    ]


def _continuing(tag: str) -> str:
    return "I-" + tag[2:] if tag.startswith("B-") else tag


def align(pred: list[tuple[str, str]], gold: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """Tags of the predicted and gold words, walked in step. Equal words pair up. When one word is a prefix
    of the other, the shorter pairs with the longer's start and the longer's rest (its tag turned from B- to
    I-) waits for the next word. Words that differ otherwise are both dropped, as the authors' walk does."""
    pred, gold = list(pred), list(gold)
    i = j = 0
    pred_tags, gold_tags = [], []
    while i < len(pred) and j < len(gold):
        (p, p_tag), (g, g_tag) = pred[i], gold[j]
        if p == g or g.startswith(p) or p.startswith(g):
            pred_tags.append(p_tag)
            gold_tags.append(g_tag)
        if p == g:
            i, j = i + 1, j + 1
        elif g.startswith(p):
            gold[j] = (g[len(p) :], _continuing(g_tag))
            i += 1
        elif p.startswith(g):
            pred[i] = (p[len(g) :], _continuing(p_tag))
            j += 1
        else:
            i, j = i + 1, j + 1
    return pred_tags, gold_tags


def gold_html(tokens: list[str], tags: list[str]) -> str:
    """A sentence's BIO tags written as the authors' gold HTML: words joined by spaces, each concept in a
    `<span class="type">`; words are HTML-escaped so that "<" or "&" in a note stays text."""
    parts, open_kind = [], None
    for token, tag in zip(tokens, tags):
        kind = tag[2:] if tag != "O" else None
        if open_kind and (tag.startswith("B-") or kind != open_kind):
            parts[-1] += "</span>"
            open_kind = None
        word = html.escape(token, quote=False)
        if kind and open_kind is None:
            word, open_kind = f'<span class="{kind}">{word}', kind
        parts.append(word)
    if open_kind:
        parts[-1] += "</span>"
    return " ".join(parts)


def ner_metrics(outputs: list[str], golds: list[str]) -> dict:
    # here, not at the top: seqeval imports scikit-learn (a second), which only i2b2's scoring needs
    from seqeval.metrics import f1_score, precision_score, recall_score

    if not golds:
        raise ValueError("no examples to score")
    pairs = [align(read_html(o), read_html(g)) for o, g in zip(outputs, golds)]
    pred, gold = [p for p, _ in pairs], [g for _, g in pairs]
    return {
        "entity_f1": float(f1_score(gold, pred, zero_division=0)),
        "entity_precision": float(precision_score(gold, pred, zero_division=0)),
        "entity_recall": float(recall_score(gold, pred, zero_division=0)),
        "examples": len(golds),
    }
