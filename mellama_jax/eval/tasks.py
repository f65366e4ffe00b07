"""Task definitions over each dataset's original local files, rendered with the authors' prompt templates.

The templates file is the one the Me-LLaMA authors published (a JSON object: dataset -> {prompt, choices, ...});
users point at their copy with --prompts. Implemented here: PubMedQA, MedQA, MedMCQA (multiple choice).
"""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

from mellama_jax.data.corpus import BadRecord, Report, read_json_file, read_jsonl


@dataclasses.dataclass(frozen=True)
class Example:
    id: str
    prompt: str
    gold: str


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    template_key: str
    lowercase: bool  # PubMedQA's outputs are lower-cased before matching

    def load(self, data: str | Path, templates: dict, split: str | Path | None = None) -> tuple[list[Example], list[str]]:
        if self.template_key not in templates:
            raise BadRecord(f"prompt templates have no {self.template_key!r} entry")
        entry = templates[self.template_key]
        return LOADERS[self.name](Path(data), entry["prompt"], entry["choices"], split), entry["choices"]


def load_templates(path: str | Path) -> dict:
    return read_json_file(path, "no prompt templates file (the authors' prompt_templates.json)")


def _pubmedqa(path: Path, prompt: str, choices, split) -> list[Example]:
    """ori_pqal.json (PMID -> record); `split` (e.g. test_ground_truth.json) selects and labels a subset."""
    data = json.loads(path.read_text())
    ids = list(json.loads(Path(split).read_text())) if split else list(data)
    out = []
    for pmid in ids:
        if pmid not in data:
            raise BadRecord(f"{path}: PubMed id {pmid} (from {split}) not found")
        r = data[pmid]
        context = "\n".join(r["CONTEXTS"])
        out.append(Example(pmid, prompt.format(context=context, text=r["QUESTION"]), r["final_decision"]))
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


def _multiple_choice(path: Path, prompt: str, choices, split) -> list[Example]:
    report = Report(strict=True)
    out = []
    for where, r in read_jsonl(path, report):
        options = _options(r.get("options"), where)
        listed = "\n".join(f"{k}. {v}" for k, v in sorted(options.items()))
        gold = r.get("answer_idx")
        if gold not in options:
            raise BadRecord(f"{where}: answer_idx {gold!r} is not one of the options {sorted(options)}")
        out.append(Example(str(r.get("realidx", where)), prompt.format(text=r["question"], options=listed), gold))
    return out


LOADERS = {"pubmedqa": _pubmedqa, "medqa": _multiple_choice, "medmcqa": _multiple_choice}
TASKS = {
    "pubmedqa": Task("pubmedqa", "PubmedQA", lowercase=True),
    "medqa": Task("medqa", "MedQA", lowercase=False),
    "medmcqa": Task("medmcqa", "MedMCQA", lowercase=False),
}
