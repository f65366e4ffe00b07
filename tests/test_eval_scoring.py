"""Each task's scoring rule against cases worked by hand from the Me-LLaMA authors' rules (BIDS-Xu-Lab/Me-LLaMA
@ 08c893f2, src/tasks/vital_measure.py and src/preprocess_instruct.py). Each table quotes the rule it checks."""

import pytest
from sklearn.metrics import f1_score

from mellama_jax.eval.ner_html import align, gold_html, ner_metrics, read_html, spans
from mellama_jax.eval.report import score_rows
from mellama_jax.eval.scoring import (
    classification_metrics,
    extractive_metrics,
    first_choice,
    labels_in,
    multilabel_metrics,
    normqa_f1,
    normqa_normalize,
    rouge,
    single_choice,
    squad_f1,
)
from mellama_jax.eval.tasks import BLUE_HOC_LABELS, TASKS, exam_question

NLI = ["entailment", "contradiction", "neutral"]
PUBMEDQA = ["yes", "no", "maybe"]
ABCDE = ["A", "B", "C", "D", "E"]
DDI = ["DDI-effect", "DDI-mechanism", "DDI-advise", "DDI-false", "DDI-int"]
HOC = [
    "sustaining proliferative signaling",
    "evading growth suppressors",
    "resisting cell death",
    "enabling replicative immortality",
    "inducing angiogenesis",
    "activating invasion and metastasis",
    "genomic instability and mutation",
    "tumor promoting inflammation",
    "cellular energetics",
    "avoiding immune destruction",
]


# Rule (Classification): output, gold and choices are lower-cased unless the task sets LOWER_CASE = False (only
# MedQA and MedMCQA do); the prediction is the first choice, in the document's choice order, that occurs in
# the output as a substring; if none occurs the prediction is "missing".
@pytest.mark.parametrize(
    "task,output,choices,expected",
    [
        ("mednli", "Entailment", NLI, "entailment"),  # case variant: ours said "missing" before
        ("mednli", "NEUTRAL.", NLI, "neutral"),
        ("mednli", "neutral, not entailment", NLI, "entailment"),  # two choices: choice order, not text order
        ("mednli", "I cannot tell", NLI, None),
        ("pubmedqa", "Yes, it does.", PUBMEDQA, "yes"),
        ("pubmedqa", "No. Maybe later", PUBMEDQA, "no"),  # "no" precedes "maybe" among the choices
        ("bionli", "CONTRADICTION", ["entailment", "contradiction"], "contradiction"),
        ("mtsample", "cosmetic / plastic surgery", ["Surgery", "Cosmetic / Plastic Surgery"], "Surgery"),
        ("medqa", "The answer is B", ABCDE, "B"),  # case kept: lower-cased, "answer" would contain "a"
        ("medqa", "the answer is b", ABCDE, None),
        ("medqa", "The answer is: C. Dopamine", ABCDE, "C"),  # C precedes D in choice order
        ("medmcqa", "b", ["A", "B", "C", "D"], None),
    ],
)
def test_first_choice_rule(task, output, choices, expected):
    assert first_choice(output, choices, TASKS[task].lowercase) == expected


def test_lower_casing_is_the_default_and_medqa_medmcqa_turn_it_off():
    assert {name for name, t in TASKS.items() if t.kind == "choice" and not t.lowercase} == {"medqa", "medmcqa", "ddi"}
    assert first_choice("The answer is B", ABCDE, lowercase=True) == "A"  # why the authors turned it off


# Rule (DDI2013): case-sensitive; every choice that occurs in the output is collected, and the answer counts
# only when exactly one was found, otherwise it is "missing".
@pytest.mark.parametrize(
    "output,expected",
    [
        ("DDI-mechanism", "DDI-mechanism"),
        ("The relation is DDI-false.", "DDI-false"),
        ("DDI-effect or DDI-advise", None),  # two labels: missing
        ("DDI-effect, DDI-effect", "DDI-effect"),  # one label, written twice
        ("ddi-effect", None),  # case-sensitive
        ("no interaction", None),
    ],
)
def test_ddi_exactly_one_rule(output, expected):
    assert single_choice(output, DDI) == expected


def test_ddi_reports_first_match_beside_exactly_one():
    rows = [
        {"gold": "DDI-effect", "choices": DDI, "output": "DDI-effect or DDI-advise"},
        {"gold": "DDI-advise", "choices": DDI, "output": "DDI-advise"},
    ]
    predictions, m = score_rows(TASKS["ddi"], rows)
    # exactly-one: [missing, DDI-advise] -> accuracy 1/2. First match: [DDI-effect, DDI-advise] -> 2/2.
    assert predictions == [None, "DDI-advise"] and m["accuracy"] == 0.5 and m["missing"] == 0.5
    assert m["first_match_accuracy"] == 1.0 and m["first_match_macro_f1"] == 1.0
    # exactly-one macro F1 over the gold labels {effect, advise}: effect tp 0 -> 0; advise tp 1, fp 0 -> 1
    assert m["macro_f1"] == 0.5


# Rule (Classification.macro_f1): scikit-learn's macro F1 with labels = set(golds): the mean over the labels
# that occur as gold answers, so a choice no example has as its answer adds nothing to the mean.
def test_macro_f1_over_the_labels_present_in_the_gold_answers():
    golds, preds = ["A", "B", "C", "D", "D"], ["A", "B", "C", "D", "E"]
    m = classification_metrics(preds, golds)
    # A, B, C: F1 1. D: tp 1, fn 1, fp 0 -> P 1, R 1/2, F1 2/3. E is no gold answer: not in the mean.
    assert m["macro_f1"] == pytest.approx((3 + 2 / 3) / 4)  # 0.917
    assert round(m["macro_f1"], 3) == 0.917 and m["accuracy"] == 0.8
    # over every choice, as we averaged before, E (tp 0, fp 1) adds a zero: 0.733
    assert f1_score(golds, preds, labels=ABCDE, average="macro") == pytest.approx((3 + 2 / 3) / 5)
    m = classification_metrics(["yes", None], ["yes", "no"])
    # missing counts wrong: yes F1 1; no: tp 0 -> 0; macro 1/2
    assert (m["accuracy"], m["macro_f1"], m["missing"]) == (0.5, 0.5, 0.5)


def test_f1_equals_scikit_learns_on_random_answers():
    """label_f1 and the metrics built on it against scikit-learn's f1_score (the authors' call) on random
    answers: single-label with missing answers and labels never predicted, and multi-label indicator arrays with
    labels that are never gold (the zero_division=0 case)."""
    import numpy as np

    rng = np.random.default_rng(0)
    choices = ["A", "B", "C", "D", "E"]
    for _ in range(50):
        n = int(rng.integers(1, 40))
        golds = [str(x) for x in rng.choice(choices[: int(rng.integers(1, 6))], n)]
        preds = [None if rng.random() < 0.1 else str(x) for x in rng.choice(choices, n)]
        m = classification_metrics(preds, golds)
        filled, labels = ["missing" if p is None else p for p in preds], sorted(set(golds))
        for avg in ("macro", "weighted"):
            want = f1_score(golds, filled, labels=labels, average=avg, zero_division=0)
            assert m[f"{avg}_f1"] == pytest.approx(want, abs=1e-12)
        truth, pred = rng.random((n, 6)) < 0.3, rng.random((n, 6)) < 0.3
        truth[:, 5] = False  # a label never gold
        got = multilabel_metrics(
            [[str(i) for i in np.flatnonzero(r)] for r in pred],
            [[str(i) for i in np.flatnonzero(r)] for r in truth],
            [str(i) for i in range(6)],
        )
        want = f1_score(truth, pred, average=None, zero_division=0)
        assert list(got["label_f1"].values()) == pytest.approx(list(want), abs=1e-12)


# Rule (HoC): a label is predicted when its exact string occurs in the stripped output (case-sensitive);
# label-wise binary F1, and the macro F1 over all ten labels (multi-label indicator arrays).
@pytest.mark.parametrize(
    "output,expected",
    [
        ("sustaining proliferative signaling; cellular energetics", [HOC[0], HOC[8]]),
        ("Resisting cell death; inducing angiogenesis", [HOC[4]]),  # "Resisting": capital R, not the label
        ("CELLULAR ENERGETICS", []),
        ("inducing angiogenesis, sustaining proliferative signaling", [HOC[0], HOC[4]]),  # label order
    ],
)
def test_hoc_case_sensitive_labels(output, expected):
    assert labels_in(output, HOC) == expected


def test_hoc_macro_f1_by_hand():
    m = multilabel_metrics([["a"], ["c", "b"], []], [["a", "b"], ["c"], []], ["a", "b", "c", "d"])
    # a: tp 1 -> F1 1; b: tp 0 (fp 1, fn 1) -> 0; c: tp 1 -> 1; d: never gold nor predicted -> 0 (sklearn's
    # zero_division, which the authors left at its default): macro over all four = 2/4.
    assert m["macro_f1"] == pytest.approx(0.5) and m["label_f1"] == {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0}
    assert m["exact_set_accuracy"] == pytest.approx(1 / 3) and m["missing"] == pytest.approx(1 / 3)


def test_blue_hoc_label_order_is_blues_own():
    # BLUE's eval_hoc.py numbers the labels alphabetically; the authors' template lists them in another order.
    assert list(BLUE_HOC_LABELS) == sorted(HOC) and BLUE_HOC_LABELS[0] == "activating invasion and metastasis"


# Rule (NormQA, EmrQA): both texts lower-cased, punctuation removed by a step that joins the remaining
# characters with spaces, whitespace collapsed: tokens are single characters. F1 = 2PR/(P+R) with
# P = |set(pred) & set(gold)| / len(pred tokens), R = the same over len(gold tokens). Whole output vs gold.
@pytest.mark.parametrize(
    "output,gold,f1",
    [
        ("aspirin", "aspirin", 6 / 7),  # 7 characters, 6 distinct: P = R = 6/7, identical answers below 1
        ("heparin", "aspirin", 5 / 7),  # shared {p, a, r, i, n}: P = 5/7 (7 tokens), R = 5/7
        ("Aspirin 81 mg.", "aspirin 81 mg", 10 / 11),  # 11 characters, 10 distinct
        ("The dose was 81 mg", "81 mg", 4 / 9),  # P = 4/14, R = 4/4 -> 2*(2/7)/(9/7)
        ("", "", 1.0),
    ],
)
def test_emrqa_normqa_character_f1(output, gold, f1):
    assert normqa_f1(output, gold) == pytest.approx(f1)


def test_emrqa_headline_and_squad_beside_it():
    assert normqa_normalize("Aspirin, 81 mg.") == "a s p i r i n 8 1 m g"
    m = extractive_metrics(["aspirin", "heparin", "Aspirin 81 mg."], [["aspirin"], ["aspirin"], ["aspirin 81 mg"]])
    assert m["f1"] == pytest.approx((6 / 7 + 5 / 7 + 10 / 11) / 3)
    assert m["exact_match"] == pytest.approx(2 / 3)  # normalised equality: pairs 1 and 3
    assert m["squad_exact_match"] == pytest.approx(2 / 3) and m["squad_f1"] == pytest.approx(2 / 3)
    # SQuAD: tokens after dropping articles; "dose was 81 mg" vs "81 mg": P 2/4, R 1 -> 2/3
    assert squad_f1("The dose was 81 mg", "81 mg") == pytest.approx(2 / 3)


# Rule (AbstractiveSummarization): ROUGE through evaluate's "rouge", i.e. rouge-score with use_stemmer=False.
def test_rouge_without_stemming():
    r = rouge(["the cats sat"], ["the cat sat"])
    # unstemmed "cats" != "cat": ROUGE-1 P = R = 2/3; no shared bigram; LCS "the sat" = 2 -> 2/3
    assert r["rouge1"] == pytest.approx(2 / 3) and r["rouge2"] == 0.0 and r["rougeL"] == pytest.approx(2 / 3)
    r = rouge(["the cat"], ["the cat sat"])  # P 1, R 2/3 -> 0.8; bigram P 1, R 1/2 -> 2/3
    assert r["rouge1"] == pytest.approx(0.8) and r["rouge2"] == pytest.approx(2 / 3)


# Rule (preprocess_instruct.py, MedQA and MedMCQA fetch_data): a question that ends in neither "?" nor "."
# gets "?" appended.
@pytest.mark.parametrize(
    "question,expected",
    [
        ("Which drug is first line", "Which drug is first line?"),
        ("Which drug is first line?", "Which drug is first line?"),
        ("Complete the statement.", "Complete the statement."),
        ("The most likely cause is:", "The most likely cause is:?"),
        ("Fever ... ", "Fever ... ?"),  # ends in a space, so neither
    ],
)
def test_question_mark_rule(question, expected):
    assert exam_question(question) == expected


# Rule (NER.html2bio): the top-level nodes of the parsed HTML. Text between them: whitespace-split words, "O".
# An element: its whole text tokenised by spaCy, tagged B-/I- by its first class when that is problem,
# treatment, test or drug, else "O". The prediction is then aligned to the gold's words (equal words pair; a
# word that is a prefix of the other pairs with it and the rest waits; otherwise both are dropped).
TOKENS = "He has chest pain and a CT scan".split()
GOLD_TAGS = ["O", "O", "B-problem", "I-problem", "O", "B-test", "I-test", "I-test"]


@pytest.mark.parametrize(
    "output,pred_tags",
    [
        ('He has <span class="problem">chest pain</span> and <span class="test">a CT scan</span>', GOLD_TAGS),
        # nested: only the outer span counts; its class names the whole text
        (
            'He has <span class="problem">chest <span class="test">pain</span></span> and a CT scan',
            ["O", "O", "B-problem", "I-problem", "O", "O", "O", "O"],
        ),
        # unclosed span: runs to the end of the output
        (
            'He has <span class="problem">chest pain and a CT scan',
            ["O", "O", "B-problem", "I-problem", "I-problem", "I-problem", "I-problem", "I-problem"],
        ),
        # stray closing tag ignored; an unknown class and a span without class are "O"
        ('He has chest pain</span> and <span class="finding">a CT</span> <span>scan</span>', ["O"] * 8),
    ],
)
def test_i2b2_html_reading(output, pred_tags):
    pred, gold = align(read_html(output), read_html(gold_html(TOKENS, GOLD_TAGS)))
    assert gold == GOLD_TAGS and pred == pred_tags


def test_i2b2_alignment_and_entity_scores_by_hand():
    gold = gold_html(TOKENS, GOLD_TAGS)
    assert gold == 'He has <span class="problem">chest pain</span> and <span class="test">a CT scan</span>'
    # "pain," -> spaCy: "pain" ","; "," vs "and": neither a prefix -> both dropped; "and" vs "a": "a" is a
    # prefix of "and" -> they pair and "nd" waits; "nd" vs "CT": dropped with it; "a" vs "scan": dropped.
    pred, g = align(read_html('He has <span class="problem">chest pain,</span> and a CT scan'), read_html(gold))
    assert pred == ["O", "O", "B-problem", "I-problem", "O"] and g == ["O", "O", "B-problem", "I-problem", "B-test"]
    m = ner_metrics(['He has <span class="problem">chest pain</span> and a <span class="test">CT scan</span>'], [gold])
    # gold entities: problem "chest pain", test "a CT scan"; predicted test "CT scan" has the wrong start:
    # 1 of 2 right each way
    assert (m["entity_precision"], m["entity_recall"], m["entity_f1"]) == (0.5, 0.5, 0.5)
    assert spans('x <span class="test">CT</span> <span class="foo">y</span>') == [("CT", "test")]
    assert gold_html(["BP", "<", "90"], ["B-test", "O", "O"]) == '<span class="test">BP</span> &lt; 90'


def test_gold_html_keeps_adjacent_concepts_of_one_type_apart():
    """i2b2's BIO tags: a B- tag starts a new concept even right after one of the same type (two problems listed
    back to back), so the gold HTML has two spans, and seqeval counts two entities."""
    from mellama_jax.eval.ner_html import gold_html

    tokens = ["fever", "cough", "and", "chest", "pain"]
    tags = ["B-problem", "B-problem", "O", "B-problem", "I-problem"]
    assert gold_html(tokens, tags) == (
        '<span class="problem">fever</span> <span class="problem">cough</span> and '
        '<span class="problem">chest pain</span>'
    )


def test_alignment_continues_a_split_gold_word_inside_its_entity():
    """The output splits the gold word "CTscan" (B-test) into "CT" and "scan": "CT" pairs with the word's start,
    and its rest "scan" continues the same entity (I-test), not a second one (which would make seqeval count two
    gold entities)."""
    pred, gold = align(
        read_html('<span class="test">CT</span>scan done'), read_html('<span class="test">CTscan</span> done')
    )
    assert (pred, gold) == (["B-test", "O", "O"], ["B-test", "I-test", "O"])
