"""Reading JSON records one by one, with every bad record reported as file:line and a reason.

The other formats (CSV, Parquet, Arrow, text files, archives) are in readers.py. Nothing is dropped silently:
a `Report` counts every skip, keeps its location, and `strict=True` turns the first one into an error.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from mellama_jax.data.streams import STREAM_ERRORS, data_suffix, numbered_lines, open_bytes

MAX_LISTED = 1000  # locations kept per report; counts are always complete
MAX_FILTER_KEYS = 100  # distinct dropped values counted by name (Pile: 22 subsets; MIMIC-III: 15 categories)


class BadRecord(ValueError):
    """A record that cannot be used; raised under --strict, otherwise counted."""


@dataclasses.dataclass
class Report:
    documents: int = 0
    tokens: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)
    locations: list = dataclasses.field(default_factory=list)
    strict: bool = False
    filtered: Counter = dataclasses.field(default_factory=Counter)  # rows a --source filter dropped, by value
    fields_seen: set = dataclasses.field(default_factory=set)  # named fields that occurred in some row

    def drop(self, key: str) -> None:
        """A row a filter did not select (not an error: counted by the value that decided it)."""
        if key not in self.filtered and len(self.filtered) >= MAX_FILTER_KEYS:
            key = key.split("=")[0] + "=<other values>"
        self.filtered[key] += 1

    def skip(self, where: str, reason: str) -> None:
        if self.strict:
            raise BadRecord(f"{where}: {reason}")
        self.skipped[reason.split(":")[0]] += 1
        if len(self.locations) < MAX_LISTED:
            self.locations.append(f"{where}: {reason}")

    def to_dict(self) -> dict:
        return {
            "documents": self.documents,
            "tokens": self.tokens,
            "skipped": dict(self.skipped),
            "skipped_total": sum(self.skipped.values()),
            "skipped_examples": self.locations,
            "filtered": dict(self.filtered),
            "filtered_total": sum(self.filtered.values()),
            "fields_seen": sorted(self.fields_seen),
        }

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
        return f"{self.documents:,} documents, {self.tokens:,} tokens, {skipped:,} skipped" + (
            f" ({why})" if skipped else ""
        )


def read_jsonl(path: str | Path, report: Report) -> Iterator[tuple[str, dict]]:
    """(location, object) for each valid JSON object line; blank lines are ignored."""
    path = Path(path)
    with open_bytes(path) as stream:
        yield from _json_lines(stream, str(path), report)


def _json_lines(stream, name: str, report: Report) -> Iterator[tuple[str, dict]]:
    for number, line in numbered_lines(stream, name, report):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            report.skip(f"{name}:{number}", f"invalid JSON: {e.msg}")
            continue
        if not isinstance(obj, dict):
            report.skip(f"{name}:{number}", f"invalid JSON: expected an object, got {type(obj).__name__}")
            continue
        yield f"{name}:{number}", obj


def read_json_file(path: str | Path, missing: str) -> object:
    """A whole JSON file; `missing` says what the absent file should have been. Errors name the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: {missing}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRecord(f"{path}: invalid JSON ({e})") from None


def read_json_records(path: str | Path, report: Report) -> Iterator[tuple[str, dict]]:
    """A .json file holding a list of objects (as ChatDoctor, Alpaca, ShareGPT and medalpaca ship), or JSON
    Lines (as Dolly ships, and as `datasets`' to_json writes even under a .json name); compressed or not."""
    path = Path(path)
    if data_suffix(path) != ".json" or _first_byte(path) != b"[":
        yield from read_jsonl(path, report)
        return
    try:
        with open_bytes(path) as f:
            data = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRecord(f"{path}: not valid UTF-8 JSON ({e})") from None
    for index, obj in enumerate(data):
        if not isinstance(obj, dict):
            report.skip(f"{path}[{index}]", f"invalid record: expected an object, got {type(obj).__name__}")
            continue
        yield f"{path}[{index}]", obj


def _first_byte(path: Path) -> bytes:
    try:
        with open_bytes(path) as f:
            for line in f:
                if line.strip():
                    return line.lstrip()[:1]
    except STREAM_ERRORS:
        pass  # read_jsonl reports it where it happens
    return b""
