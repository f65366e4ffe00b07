"""Reading local corpora record by record, with every bad record reported as file:line and a reason.

Formats: JSONL (one object per line), plain text (documents separated by blank lines), Parquet.
Nothing is dropped silently: a `Report` counts every skip, keeps its location, and `strict=True` turns the
first one into an error.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

MAX_LISTED = 1000  # locations kept per report; counts are always complete


class BadRecord(ValueError):
    """A record that cannot be used; raised under --strict, otherwise counted."""


@dataclasses.dataclass
class Report:
    documents: int = 0
    tokens: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)
    locations: list = dataclasses.field(default_factory=list)
    strict: bool = False

    def skip(self, where: str, reason: str) -> None:
        if self.strict:
            raise BadRecord(f"{where}: {reason}")
        self.skipped[reason.split(":")[0]] += 1
        if len(self.locations) < MAX_LISTED:
            self.locations.append(f"{where}: {reason}")

    def merge(self, other: "Report") -> None:
        self.documents += other.documents
        self.tokens += other.tokens
        self.skipped.update(other.skipped)
        self.locations.extend(other.locations[: max(0, MAX_LISTED - len(self.locations))])

    def to_dict(self) -> dict:
        return {"documents": self.documents, "tokens": self.tokens, "skipped": dict(self.skipped),
                "skipped_total": sum(self.skipped.values()), "skipped_examples": self.locations}

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
        return (f"{self.documents:,} documents, {self.tokens:,} tokens, {skipped:,} skipped"
                + (f" ({why})" if skipped else ""))


def _lines(path: Path, report: Report) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                report.skip(f"{path}:{number}", f"invalid UTF-8: {e.reason} at byte {e.start}")


def read_jsonl(path: str | Path, report: Report) -> Iterator[tuple[str, dict]]:
    """(location, object) for each valid JSON object line; blank lines are ignored."""
    path = Path(path)
    for number, line in _lines(path, report):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            report.skip(f"{path}:{number}", f"invalid JSON: {e.msg}")
            continue
        if not isinstance(obj, dict):
            report.skip(f"{path}:{number}", f"invalid JSON: expected an object, got {type(obj).__name__}")
            continue
        yield f"{path}:{number}", obj


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
    """A .json file holding a list of objects (as ChatDoctor and Alpaca ship), or JSONL."""
    path = Path(path)
    if path.suffix != ".json":
        yield from read_jsonl(path, report)
        return
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRecord(f"{path}: not valid UTF-8 JSON ({e})") from None
    if not isinstance(data, list):
        raise BadRecord(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for index, obj in enumerate(data):
        if not isinstance(obj, dict):
            report.skip(f"{path}[{index}]", f"invalid record: expected an object, got {type(obj).__name__}")
            continue
        yield f"{path}[{index}]", obj


def text_of(obj: dict, fields: tuple[str, ...], where: str, report: Report) -> str | None:
    parts = []
    for field in fields:
        value = obj.get(field)
        if value is None:
            report.skip(where, f"missing field: {field!r}")
            return None
        if not isinstance(value, str):
            report.skip(where, f"missing field: {field!r} is not a string")
            return None
        parts.append(value)
    text = "\n".join(p for p in parts if p.strip())
    if not text.strip():
        report.skip(where, "empty text")
        return None
    return text


def read_documents(path: str | Path, fields: tuple[str, ...], report: Report) -> Iterator[tuple[str, str]]:
    """(location, text) for each usable document of a JSONL, text or Parquet file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such input file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        for where, obj in read_json_records(path, report):
            text = text_of(obj, fields, where, report)
            if text is not None:
                yield where, text
    elif suffix == ".txt":
        start, buffer = 1, []
        for number, line in _lines(path, report):
            if line.strip():
                if not buffer:
                    start = number
                buffer.append(line)
            elif buffer:
                yield f"{path}:{start}", "".join(buffer).strip()
                buffer = []
        if buffer:
            yield f"{path}:{start}", "".join(buffer).strip()
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
        except Exception as e:
            raise BadRecord(f"{path}: not a readable Parquet file ({e})") from None
        missing = [f for f in fields if f not in table.schema_arrow.names]
        if missing:
            raise BadRecord(f"{path}: Parquet columns {missing} not found; columns: {table.schema_arrow.names}")
        row = 0
        for batch in table.iter_batches(columns=list(fields)):
            for obj in batch.to_pylist():
                row += 1
                text = text_of(obj, fields, f"{path}:row {row}", report)
                if text is not None:
                    yield f"{path}:row {row}", text
    else:
        raise BadRecord(f"{path}: unsupported input format {suffix!r} (use .jsonl, .json, .txt or .parquet)")
