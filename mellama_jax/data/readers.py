"""The documents of one unit of work: its rows read by format, selected by the source's filters, and joined
into text. Every row that is not used is counted: by a filter's value (selected away, not an error) or as a
skip with its file:line and reason (a bad row)."""

from __future__ import annotations

import collections
import csv
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mellama_jax.data.corpus import BadRecord, Report, read_json_records
from mellama_jax.data.sources import FORMATS, Selection, Unit, hf_files
from mellama_jax.data.streams import data_suffix, numbered_lines, open_bytes, open_zip, read_member

_MISSING = object()


def lookup(row: dict, field: str):
    """row[field], where a dotted field reaches into nested objects (meta.pile_set_name)."""
    if field in row:
        return row[field]
    value = row
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _admits(row: dict, selection: Selection, report: Report) -> bool:
    for f in selection.filters:
        value = lookup(row, f.field)
        if value is _MISSING:
            if f.keep:
                report.drop(f"{f.field} missing")
                return False
            continue
        report.fields_seen.add(f.field)
        value = str(value).strip()
        if (value in f.values) != f.keep:
            report.drop(f"{f.field}={value}")
            return False
    return True


def text_of(row: dict, fields: tuple[str, ...], where: str, report: Report) -> str | None:
    parts = []
    for field in fields:
        value = lookup(row, field)
        if value is _MISSING or value is None:
            report.skip(where, f"missing field: {field!r}")
            return None
        report.fields_seen.add(field)
        if not isinstance(value, str):
            report.skip(where, f"missing field: {field!r} is not a string")
            return None
        parts.append(value)
    text = "\n".join(p for p in parts if p.strip())
    if not text.strip():
        report.skip(where, "empty text")
        return None
    return text


def _check_columns(path: str, columns: list[str], selection: Selection) -> list[str]:
    """The columns holding the selection's fields; a field in none of them is an error naming the file."""
    needed = [f.split(".")[0] if f not in columns else f for f in selection.fields()]
    missing = [f for f in needed if f not in columns]
    if missing:
        raise BadRecord(f"{path}: no column {missing[0]!r}; columns: {', '.join(columns)}")
    return list(dict.fromkeys(needed))


# --------------------------------------------------------------------------- rows by format


class _Lines:
    """The lines csv.reader parses, remembering those of the record in progress, so that after a malformed
    record parsing restarts on its second line: an unterminated quote costs that record, not the file."""

    def __init__(self, lines: Iterator[tuple[int, str]]):
        self.lines, self.replay, self.record = lines, collections.deque(), []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        item = self.replay.popleft() if self.replay else next(self.lines)
        self.record.append(item)
        return item[1]

    def restart(self):
        self.replay.extendleft(reversed(self.record[1:]))
        self.record = []
        return csv.reader(self, strict=True)

    def start(self) -> int:
        first = self.record[0][0]
        self.record = []
        return first


def csv_rows(unit: Unit, report: Report) -> Iterator[tuple[str, dict]]:
    csv.field_size_limit(1 << 30)  # a discharge summary can exceed the default 128 KB field
    with open_bytes(unit.path) as stream:
        lines = _Lines(numbered_lines(stream, unit.path, report))
        reader = csv.reader(lines, strict=True)
        header = next(reader, None)
        if header is None:
            return
        lines.record = []
        _check_columns(unit.path, header, unit.selection)
        bad = None  # (first line, problem) of a malformed stretch, reported where it ends
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                bad = bad or (lines.record[0][0], str(e))
                reader = lines.restart()
                continue
            if not row:
                lines.record = []
                continue
            if len(row) != len(header):
                bad = bad or (lines.record[0][0], f"{len(row)} fields where the header has {len(header)}")
                reader = lines.restart()
                continue
            first = lines.start()
            if bad:
                report.skip(f"{unit.path}:{bad[0]}", f"malformed CSV row: {bad[1]} (lines {bad[0]}-{first - 1})")
                bad = None
            yield f"{unit.path}:{first}", dict(zip(header, row))
        if bad:
            report.skip(f"{unit.path}:{bad[0]}", f"malformed CSV row: {bad[1]} (to the end of the file)")


def _columns(path: str, names: list[str], selection: Selection | None) -> list[str]:
    return names if selection is None else _check_columns(path, names, selection)


def parquet_rows(path: str, selection: Selection | None) -> Iterator[tuple[str, dict]]:
    """Rows with the selection's columns (all columns without one)."""
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several unrelated types for a damaged file
        raise BadRecord(f"{path}: not a readable Parquet file ({e})") from None
    columns = _columns(path, table.schema_arrow.names, selection)
    row = 0
    for batch in table.iter_batches(batch_size=1024, columns=columns):
        for obj in batch.to_pylist():
            row += 1
            yield f"{path}:row {row}", obj


def _arrow_batches(path: str):
    source = pa.memory_map(path)
    try:  # `datasets` writes the IPC stream format; pyarrow's files use the file format
        yield from pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        source.seek(0)
        try:
            reader = pa.ipc.open_file(source)
        except pa.ArrowInvalid as e:
            raise BadRecord(f"{path}: not a readable Arrow file ({e})") from None
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)


def arrow_rows(path: str, selection: Selection | None) -> Iterator[tuple[str, dict]]:
    row, columns = 0, None
    for batch in _arrow_batches(path):
        columns = columns or _columns(path, batch.schema.names, selection)
        for obj in batch.select(columns).to_pylist():
            row += 1
            yield f"{path}:row {row}", obj


def jsonl_rows(unit: Unit, report: Report) -> Iterator[tuple[str, dict]]:
    yield from read_json_records(unit.path, report)


def txt_rows(unit: Unit, report: Report) -> Iterator[tuple[str, dict]]:
    """Documents separated by blank lines."""
    start, buffer = 1, []
    with open_bytes(unit.path) as stream:
        for number, line in numbered_lines(stream, unit.path, report):
            if line.strip():
                start = start if buffer else number
                buffer.append(line)
            elif buffer:
                yield f"{unit.path}:{start}", {"text": "".join(buffer).strip()}
                buffer = []
    if buffer:
        yield f"{unit.path}:{start}", {"text": "".join(buffer).strip()}


def file_rows(unit: Unit, report: Report) -> Iterator[tuple[str, dict]]:
    """One document per text file, of a folder tree or a zip."""
    if Path(unit.path).is_dir():
        for member in unit.members:
            where = f"{unit.path}/{member}"
            try:
                yield where, {"text": (Path(unit.path) / member).read_bytes().decode("utf-8").strip()}
            except UnicodeDecodeError as e:
                report.skip(where, f"invalid UTF-8: {e.reason} at byte {e.start}")
        return
    with open_zip(unit.path) as archive:
        for member in unit.members:
            where = f"{unit.path}:{member}"
            text = read_member(archive, member, where, report)
            if text is not None:
                yield where, {"text": text.strip()}


ROWS = {
    "jsonl": jsonl_rows,
    "csv": csv_rows,
    "parquet": lambda u, r: parquet_rows(u.path, u.selection),
    "arrow": lambda u, r: arrow_rows(u.path, u.selection),
    "txt": txt_rows,
    "files": file_rows,
}


def documents(unit: Unit, report: Report) -> Iterator[tuple[str, str]]:
    """(location, text) of each document the unit's selection keeps."""
    if not Path(unit.path).exists():
        raise FileNotFoundError(f"{unit.path}: no such input file")
    for where, row in ROWS[unit.format](unit, report):
        if _admits(row, unit.selection, report):
            text = text_of(row, unit.selection.text, where, report)
            if text is not None:
                yield where, text


def records(path: str | Path, report: Report) -> Iterator[tuple[str, dict]]:
    """Every record of a JSON / JSON Lines / Parquet / Arrow file, or of a `datasets` folder (save_to_disk
    output, or a folder of such files), with all their fields: instruction data as it ships."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such input file")
    for file in hf_files(path, ()) if path.is_dir() else [path]:
        fmt = FORMATS.get(data_suffix(file))
        if fmt == "jsonl":
            yield from read_json_records(file, report)
        elif fmt in ("parquet", "arrow"):
            yield from (parquet_rows if fmt == "parquet" else arrow_rows)(str(file), None)
        else:
            raise BadRecord(
                f"{file}: unsupported input format (use .json, .jsonl, .parquet, .arrow or a `datasets` folder)"
            )
