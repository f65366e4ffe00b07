"""The paper's 12 benchmark tasks over each dataset's original local files, rendered with the authors' prompts.

The templates are the ones the Me-LLaMA authors published (`prompt_templates.json`: dataset -> {prompt,
choices, ...}); users point at their copy with --prompts. The authors published none for i2b2 and BioNLI:
`templates.json` beside this file supplies ours for those two (a user's file takes precedence).

A loader turns one file into `Example`s: the fields its template is filled with (formatted as the authors'
src/preprocess_instruct.py formats each dataset), the gold answer in the form its scorer wants, and the answer
as text (what a few-shot demonstration shows after its prompt).
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

from mellama_jax.data.corpus import BadRecord, Report, read_json_file, read_json_records
from mellama_jax.eval.ner_html import gold_html

PACKAGE_TEMPLATES = Path(__file__).with_name("templates.json")


@dataclasses.dataclass(frozen=True)
class Example:
    id: str
    fields: dict  # template placeholders -> text
    gold: object  # a label, a list of labels, a list of answers, a list of BIO tags, or a reference text
    answer: str  # the gold answer as the model should write it


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    template_key: str
    kind: str  # choice | multilabel | extractive | ner | summary: picks the scorer
    loader: Callable[[Path, dict, Path | None], list[Example]]
    # choice tasks (the authors' Classification): output, gold and choices are lower-cased unless turned off
    lowercase: bool = True
    exactly_one: bool = False  # DDI: an answer only when exactly one choice occurs (case-sensitive)


# The authors' harness decodes greedily up to 256 new tokens for every task, stopping only at EOS.
HARNESS_MAX_NEW_TOKENS = 256

# The authors' --model_prompt wrappers (src/model_prompt.py:1-12, BIDS-Xu-Lab/Me-LLaMA @ 08c893f2; default
# no_prompt, src/eval.py:18), applied to the whole few-shot context, once (src/evaluator.py:255-259). The
# `mellama` instruction template of `prepare instruct` renders training prompts the same way.
MODEL_PROMPTS = {"none": "{ctx}", "mellama": "Human: \n{ctx}\n\nAssistant: \n"}


def wrap_prompt(ctx: str, model_prompt: str = "none") -> str:
    if model_prompt not in MODEL_PROMPTS:
        raise ValueError(f"--model-prompt must be one of {sorted(MODEL_PROMPTS)}, got {model_prompt!r}")
    return MODEL_PROMPTS[model_prompt].format(ctx=ctx)


def load_templates(path: str | Path | None) -> dict:
    """Our templates (i2b2, BioNLI) overlaid by the user's file, the authors' prompt_templates.json."""
    templates = json.loads(PACKAGE_TEMPLATES.read_text())
    if path is not None:
        user = read_json_file(path, "no prompt templates file (the authors' prompt_templates.json)")
        if not isinstance(user, dict):
            raise BadRecord(f"{path}: expected a JSON object dataset -> template")
        templates.update(user)
    return templates


def render(template: str, fields: dict) -> str:
    """Fill `{name}` placeholders by plain replacement: templates may contain other braces."""
    for name, value in fields.items():
        template = template.replace("{" + name + "}", value)
    return template


def _need(record: dict, keys: tuple[str, ...], where: str):
    for key in keys:
        if record.get(key) not in (None, ""):
            return record[key]
    raise BadRecord(f"{where}: missing field (one of {', '.join(keys)})")


def _records(path: Path) -> list[tuple[str, dict]]:
    """(location, row) from JSONL, a JSON list, CSV or TSV (with a header row)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such dataset file")
    if path.suffix.lower() in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            return [(f"{path}:{i + 2}", dict(r)) for i, r in enumerate(rows)]
    return list(read_json_records(path, Report(strict=True)))


# ------------------------------------------------------------------------------------------ multiple choice


def _pubmedqa(path: Path, entry: dict, split: Path | None) -> list[Example]:
    """ori_pqal.json (PMID -> record); `split` (e.g. test_ground_truth.json) selects a subset."""
    data = read_json_file(path, "no PubMedQA file (ori_pqal.json)")
    ids = list(read_json_file(split, "no split file")) if split else list(data)
    out = []
    for pmid in ids:
        if pmid not in data:
            raise BadRecord(f"{path}: PubMed id {pmid} (from {split}) not found")
        r = data[pmid]
        out.append(
            Example(
                pmid,
                {"context": "\n".join(r["CONTEXTS"]), "text": r["QUESTION"]},
                r["final_decision"],
                r["final_decision"],
            )
        )
    return out


def _options(value, where: str) -> dict:
    if isinstance(value, str):  # some exports store the dict as its Python repr
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise BadRecord(f"{where}: options are not a mapping") from None
    if not isinstance(value, dict):
        raise BadRecord(f"{where}: options are not a mapping")
    return value


def exam_question(question: str) -> str:
    """MedQA/MedMCQA questions as the authors formatted them: "?" appended unless they end in "?" or "."."""
    return question if question.endswith(("?", ".")) else question + "?"


def _multiple_choice(path: Path, entry: dict, split) -> list[Example]:
    """MedQA / MedMCQA JSONL: question, options {A: ..}, answer_idx."""
    out = []
    for where, r in _records(path):
        options = _options(r.get("options"), where)
        gold = r.get("answer_idx")
        if gold not in options:
            raise BadRecord(f"{where}: answer_idx {gold!r} is not one of the options {sorted(options)}")
        listed = "\n".join(f"{k}. {v}" for k, v in sorted(options.items()))
        fields = {"text": exam_question(r["question"]), "options": listed}
        out.append(Example(str(r.get("realidx", where)), fields, gold, gold))
    return out


def _labelled(text_of: Callable[[dict, str], str], label_keys: tuple[str, ...], aliases: dict | None = None):
    """A loader for one-label classification files: the label must be one of the template's choices."""

    def load(path: Path, entry: dict, split) -> list[Example]:
        out = []
        for where, r in _records(path):
            label = str(_need(r, label_keys, where)).strip()
            label = (aliases or {}).get(label.lower(), label)
            if label not in entry["choices"]:
                raise BadRecord(f"{where}: label {label!r} is not one of {entry['choices']}")
            out.append(
                Example(
                    str(r.get("pairID") or r.get("id") or r.get("index") or where),
                    {"text": text_of(r, where)},
                    label,
                    label,
                )
            )
        return out

    return load


def _nli_text(r: dict, where: str) -> str:
    """The authors' MedNLI input: "[PRE] premise [HYP] hypothesis" (BioNLI, ours, is written the same way)."""
    premise = _need(r, ("sentence1", "premise", "supp_set"), where)
    hypothesis = _need(r, ("sentence2", "hypothesis", "conclusion"), where)
    return f"[PRE] {premise} [HYP] {hypothesis}"


# MedNLI: mli_{train,dev,test}_v1.jsonl (sentence1, sentence2, gold_label).
_mednli = _labelled(_nli_text, ("gold_label", "label"))
# BioNLI (Bastan et al. 2022): premise = the supporting abstract text, hypothesis = a (perturbed) conclusion,
# label_cat pos/neg; JSONL or CSV.
_bionli = _labelled(
    _nli_text,
    ("label_cat", "gold_label", "label"),
    {"pos": "entailment", "neg": "contradiction", "1": "entailment", "0": "contradiction"},
)
# DDI 2013 as BLUE distributes it: TSV (index, sentence with @DRUG$ masks, label).
_ddi = _labelled(lambda r, w: _need(r, ("sentence", "text"), w), ("label",))
# MTSamples (mtsamples.csv): transcription (stripped, as the authors' input), medical_specialty.
_mtsample = _labelled(lambda r, w: str(_need(r, ("transcription", "text"), w)).strip(), ("medical_specialty", "label"))


# --------------------------------------------------------------------------------------------- multi-label


# BLUE's own HoC label order (ncbi-nlp/BLUE_Benchmark, blue/eval_hoc.py LABELS): alphabetical. Its TSVs
# number labels by this list ("0_1" = activating invasion and metastasis present), not by the template's order.
BLUE_HOC_LABELS = (
    "activating invasion and metastasis",
    "avoiding immune destruction",
    "cellular energetics",
    "enabling replicative immortality",
    "evading growth suppressors",
    "genomic instability and mutation",
    "inducing angiogenesis",
    "resisting cell death",
    "sustaining proliferative signaling",
    "tumor promoting inflammation",
)


def _hoc(path: Path, entry: dict, split) -> list[Example]:
    """HoC: TSV/CSV (sentence, labels) or JSONL (text, labels). Labels: a list, names joined by ';' or ',', or
    BLUE's index pairs "0_1,1_0,..." (index into BLUE_HOC_LABELS, 1 = present)."""
    topics = entry["choices"]
    out = []
    for where, r in _records(path):
        raw = r.get("labels", r.get("label"))
        if raw is None:
            raise BadRecord(f"{where}: missing field (labels)")
        items = raw if isinstance(raw, list) else [x.strip() for x in re.split(r"[;,]", str(raw)) if x.strip()]
        if items and all(re.fullmatch(r"\d+_[01]", str(x)) for x in items):
            items = [BLUE_HOC_LABELS[int(x.split("_")[0])] for x in items if x.endswith("_1")]
        unknown = [x for x in items if x not in topics]
        if unknown:
            raise BadRecord(f"{where}: labels {unknown} are not HoC topics {topics}")
        labels = sorted(set(items), key=topics.index)
        out.append(
            Example(
                str(r.get("index") or r.get("id") or where),
                {"text": _need(r, ("sentence", "text", "abstract"), where)},
                labels,
                "; ".join(labels),
            )
        )
    return out


# ------------------------------------------------------------------------------------------- extractive QA


def _first(value):
    return value[0] if isinstance(value, list) else value


def _emrqa(path: Path, entry: dict, split) -> list[Example]:
    """emrQA's release JSON (data -> paragraphs -> qas; context and question may be lists of lines and
    paraphrases) or SQuAD-style JSON; also JSONL with context, question, answers."""
    if path.suffix.lower() == ".jsonl":
        out = []
        for where, r in _records(path):
            answers = _answers(r.get("answers"), where)
            out.append(
                Example(
                    str(r.get("id", where)),
                    {
                        "text": str(_need(r, ("context",), where)).strip(),
                        "question": str(_need(r, ("question",), where)).strip(),
                    },
                    answers,
                    answers[0],
                )
            )
        return out
    data = read_json_file(path, "no emrQA file")
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise BadRecord(f"{path}: expected an object with a 'data' list (emrQA / SQuAD layout)")
    out = []
    for i, article in enumerate(data["data"]):
        for j, paragraph in enumerate(article.get("paragraphs", [])):
            context = paragraph.get("context")
            context = "\n".join(context) if isinstance(context, list) else context
            for k, qa in enumerate(paragraph.get("qas", [])):
                where = f"{path}: data[{i}].paragraphs[{j}].qas[{k}]"
                if not context:
                    raise BadRecord(f"{where}: paragraph has no context")
                answers = _answers(qa.get("answers"), where)
                fields = {"text": context.strip(), "question": str(_first(qa["question"])).strip()}
                out.append(Example(str(qa.get("id", where)), fields, answers, answers[0]))
    return out


def _answers(value, where: str) -> list[str]:
    texts = [_first(a.get("text")) if isinstance(a, dict) else a for a in (value or [])]
    texts = [str(t) for t in texts if t]
    if not texts:
        raise BadRecord(f"{where}: no answer text")
    return texts


# ---------------------------------------------------------------------------------------------------- NER


def _ner(path: Path, entry: dict, split) -> list[Example]:
    """i2b2 2010 concepts: a directory with the release's txt/ and concept/ folders (one sentence per line,
    `c="text" line:tok line:tok||t="type"`), or a CoNLL file (token and BIO tag per line, blank between
    sentences). The gold is the sentence as HTML with `<span class="type">` concepts, as the authors scored."""
    sentences = _i2b2_dir(path) if path.is_dir() else _conll(path)
    out = []
    for where, tokens, tags in sentences:
        tagged = gold_html(tokens, tags)
        out.append(Example(where, {"text": " ".join(tokens)}, tagged, tagged))
    return out


def _conll(path: Path) -> list[tuple[str, list[str], list[str]]]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such dataset file")
    sentences, tokens, tags, start = [], [], [], 1
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines() + [""], start=1):
        if not line.strip():
            if tokens:
                sentences.append((f"{path}:{start}", tokens, tags))
            tokens, tags, start = [], [], number + 1
            continue
        parts = line.split()
        if len(parts) < 2 or not re.fullmatch(r"O|[BI]-\S+", parts[-1]):
            raise BadRecord(f"{path}:{number}: expected 'token ... BIO-tag', got {line!r}")
        tokens.append(parts[0])
        tags.append(parts[-1])
    return sentences


_CONCEPT = re.compile(r'c="(.*)" (\d+):(\d+) (\d+):(\d+)\|\|t="([^"]+)"')


def _i2b2_dir(path: Path) -> list[tuple[str, list[str], list[str]]]:
    if not (path / "txt").is_dir() or not (path / "concept").is_dir():
        raise BadRecord(f"{path}: expected the i2b2 release layout with txt/ and concept/ folders")
    sentences = []
    for txt in sorted((path / "txt").glob("*.txt")):
        lines = [line.split() for line in txt.read_text(encoding="utf-8").splitlines()]
        tags = [["O"] * len(tokens) for tokens in lines]
        con = path / "concept" / (txt.stem + ".con")
        if not con.exists():
            raise BadRecord(f"{txt}: no concept file {con}")
        for number, line in enumerate(con.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            m = _CONCEPT.fullmatch(line.strip())
            if not m or m[2] != m[4]:
                raise BadRecord(f"{con}:{number}: not a one-line i2b2 concept: {line!r}")
            row, first, last = int(m[2]) - 1, int(m[3]), int(m[5])
            if row >= len(lines) or last >= len(lines[row]) or first > last:
                raise BadRecord(f"{con}:{number}: offsets {m[2]}:{first}-{last} fall outside {txt.name}")
            tags[row][first : last + 1] = [f"B-{m[6]}"] + [f"I-{m[6]}"] * (last - first)
        sentences += [(f"{txt}:{i + 1}", tokens, t) for i, (tokens, t) in enumerate(zip(lines, tags)) if tokens]
    return sentences


# ---------------------------------------------------------------------------------------------- summaries


def _pairs(source_keys: tuple[str, ...], target_keys: tuple[str, ...]):
    """A loader for (document, reference summary) JSONL/CSV; list-valued fields (Cohan et al.'s PubMed set:
    article_text, abstract_text with <S> </S> sentence tags) are joined."""

    def text(value) -> str:
        if isinstance(value, list):
            return " ".join(" ".join(re.sub(r"</?S>", " ", str(v)).split()) for v in value)
        return str(value).strip()

    def load(path: Path, entry: dict, split) -> list[Example]:
        out = []
        for where, r in _records(path):
            source, target = text(_need(r, source_keys, where)), text(_need(r, target_keys, where))
            out.append(
                Example(
                    str(r.get("article_id") or r.get("pmid") or r.get("id") or where), {"text": source}, target, target
                )
            )
        return out

    return load


_SECTION = re.compile(r"^\s*([A-Z][A-Z /&]+):", re.M)


def _report_sections(text: str) -> dict[str, str]:
    """A free-text radiology report's sections (FINDINGS:, IMPRESSION:, ...) by their upper-case headers."""
    heads = list(_SECTION.finditer(text))
    return {
        m[1].strip(): text[m.end() : nxt.start() if nxt else len(text)].strip()
        for m, nxt in zip(heads, heads[1:] + [None])
    }


def _mimic_cxr(path: Path, entry: dict, split) -> list[Example]:
    """MIMIC-CXR reports: a directory tree of the release's .txt reports (findings -> impression; reports
    lacking either section are skipped and counted in the summary), or JSONL with findings, impression."""
    if not path.is_dir():
        return _pairs(("findings",), ("impression",))(path, entry, split)
    out = []
    for report in sorted(path.rglob("*.txt")):
        sections = _report_sections(report.read_text(encoding="utf-8", errors="replace"))
        if sections.get("FINDINGS") and sections.get("IMPRESSION"):
            out.append(
                Example(
                    str(report.relative_to(path)),
                    {"text": sections["FINDINGS"]},
                    sections["IMPRESSION"],
                    sections["IMPRESSION"],
                )
            )
    if not out:
        raise BadRecord(f"{path}: no report with both FINDINGS: and IMPRESSION: sections")
    return out


TASKS = {
    t.name: t
    for t in [
        Task("pubmedqa", "PubmedQA", "choice", _pubmedqa),
        Task("medqa", "MedQA", "choice", _multiple_choice, lowercase=False),
        Task("medmcqa", "MedMCQA", "choice", _multiple_choice, lowercase=False),
        Task("mednli", "MedNLI", "choice", _mednli),
        Task("bionli", "BioNLI", "choice", _bionli),
        Task("ddi", "DDI2013", "choice", _ddi, lowercase=False, exactly_one=True),
        Task("mtsample", "MTSample", "choice", _mtsample),
        Task("hoc", "HoC", "multilabel", _hoc),
        Task("emrqa", "EmrQA", "extractive", _emrqa),
        Task("i2b2", "i2b2", "ner", _ner),
        Task(
            "pubmedsum",
            "PubmedSumm",
            "summary",
            _pairs(("article_text", "src", "article", "text"), ("abstract_text", "tgt", "abstract", "summary")),
        ),
        Task("pubmed-title", "PubMed_Summ", "summary", _pairs(("abstract",), ("title",))),
        Task("mimic-cxr", "MIMIC_SUM", "summary", _mimic_cxr),
    ]
}


def load_task(
    name: str, data: str | Path, templates: dict, split: str | Path | None = None
) -> tuple[Task, list[Example], dict]:
    """The task, its examples and its template entry."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; implemented: {sorted(TASKS)}")
    task = TASKS[name]
    if task.template_key not in templates:
        raise BadRecord(f"prompt templates have no {task.template_key!r} entry (task {name})")
    entry = templates[task.template_key]
    examples = task.loader(Path(data), entry, Path(split) if split else None)
    if not examples:
        raise BadRecord(f"{data}: no examples")
    return task, examples, entry
