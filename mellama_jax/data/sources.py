"""`--source` specs: what a pretraining source reads, which rows it keeps, and the units of work it makes.

    NAME=KIND:PATH[?OPTION=VALUE[&OPTION=VALUE...]]
    NAME=FILE[,FILE...]                 kind from each file's suffix (the older form)

KIND (docs/data.md has the paper's corpora):
  jsonl    JSON Lines, or a .json list; .gz/.zst compressed or not; a folder means every such file in it
  pile     The Pile's shards: jsonl whose rows carry meta.pile_set_name; `subset=` selects by that name
  csv      CSV with a header row (MIMIC's NOTEEVENTS.csv.gz, discharge.csv.gz); quoted multi-line fields
  parquet  Parquet files
  txt      plain text, documents separated by blank lines
  cxr      one document per .txt file: a folder tree (MIMIC-CXR's files/p10/...) or a .zip of one
  hf       a `datasets` folder: save_to_disk output (Dataset or DatasetDict) or a folder of its
           Arrow / Parquet / JSON files
PATH: a file, a folder, or a glob (`*`, `**`, `[...]`; `?` starts the options, so it is no wildcard here).
OPTIONS (URL-style: `+` is a space, %2C a comma, %26 an ampersand):
  text=F[,F...]            fields joined by newlines into the document (default: text); a.b reaches into
                           nested objects (JSON)
  where=FIELD=V[,V...]     keep rows whose FIELD is one of the values (compared with spaces trimmed)
  where=FIELD!=V[,V...]    keep rows whose FIELD is none of them (a row without FIELD is kept);
                           repeat `where` for more conditions, all of which must hold
  subset=NAME[,NAME...]    pile only: where=meta.pile_set_name=NAME,...
  split=NAME[,NAME...]     hf only: the splits of a DatasetDict (default: all)

Each input file is one unit of work (a shard of the output); a cxr tree or zip is cut into units of
10,000 reports. Units are what processes and hosts share out, and what a re-run skips when done.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import heapq
import json
import re
from pathlib import Path
from urllib.parse import unquote_plus

from mellama_jax.data.streams import COMPRESSED, data_suffix, open_zip

FILES_PER_UNIT = 10_000
_FIELD_KINDS = ("jsonl", "pile", "csv", "parquet", "hf")
OPTIONS = {"text": _FIELD_KINDS, "where": _FIELD_KINDS, "subset": ("pile",), "split": ("hf",)}
KINDS = ("jsonl", "pile", "csv", "parquet", "txt", "cxr", "hf")
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow", ".txt": "txt"}
KIND_FORMATS = {
    "jsonl": {"jsonl"},
    "pile": {"jsonl"},
    "csv": {"csv"},
    "parquet": {"parquet"},
    "txt": {"txt"},
    "hf": {"jsonl", "parquet", "arrow"},
}


class SourceError(ValueError):
    """A --source spec that cannot be used (exit code 2, one line)."""


@dataclasses.dataclass(frozen=True)
class Filter:
    field: str
    values: tuple[str, ...]
    keep: bool  # True: keep rows whose field is one of `values`; False: drop those

    def describe(self) -> str:
        return f"{self.field}{'=' if self.keep else '!='}{','.join(self.values)}"


@dataclasses.dataclass(frozen=True)
class Selection:
    text: tuple[str, ...] = ("text",)
    filters: tuple[Filter, ...] = ()

    def fields(self) -> list[str]:
        return list(dict.fromkeys([*self.text, *(f.field for f in self.filters)]))


@dataclasses.dataclass(frozen=True)
class Spec:
    source: str
    kind: str
    pattern: str
    selection: Selection
    splits: tuple[str, ...] = ()
    raw: str = ""


@dataclasses.dataclass(frozen=True)
class Unit:
    source: str
    name: str
    format: str  # jsonl, csv, parquet, arrow, txt, files
    path: str
    selection: Selection
    members: tuple[str, ...] = ()  # files: this unit's .txt files (relative to path) or zip members
    size: int = 0
    fingerprint: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)


# --------------------------------------------------------------------------- parsing


def _values(text: str) -> tuple[str, ...]:
    return tuple(v for v in (unquote_plus(p).strip() for p in text.split(",")) if v)


def _filter(text: str, where: str) -> Filter:
    match = re.fullmatch(r"([^=!]+)(!=|=)(.+)", text)
    if not match:
        raise SourceError(f"{where}: where={text!r} is not FIELD=VALUE[,VALUE] or FIELD!=VALUE[,VALUE]")
    return Filter(unquote_plus(match[1]).strip(), _values(match[3]), match[2] == "=")


def parse_spec(source: str, value: str, fields: tuple[str, ...] | None = None) -> list[Spec]:
    """The specs of one `--source NAME=VALUE` (several for the older comma-separated file list)."""
    where = f"--source {source}={value}"
    match = re.fullmatch(r"([a-z]+):(.*)", value, re.S)
    if not match or (match[1] not in KINDS and Path(value).exists()):
        return [_legacy(source, v, fields) for v in value.split(",") if v]
    kind, rest = match[1], match[2]
    if kind not in KINDS:
        raise SourceError(f"{where}: unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
    pattern, _, query = rest.partition("?")
    text, filters, splits = None, [], ()
    for part in (p for p in query.split("&") if p):
        key, sep, val = part.partition("=")
        if not sep or key not in OPTIONS:
            raise SourceError(f"{where}: unknown option {part!r}; options: {', '.join(OPTIONS)}")
        if kind not in OPTIONS[key]:
            raise SourceError(f"{where}: option {key!r} does not apply to {kind}: sources")
        if key == "text":
            text = _values(val)
        elif key == "where":
            filters.append(_filter(val, where))
        elif key == "subset":
            filters.append(Filter("meta.pile_set_name", _values(val), True))
        else:
            splits = _values(val)
    if text and fields:
        raise SourceError(f"{where}: text fields given twice (?text= and --fields {source}=...)")
    if not pattern:
        raise SourceError(f"{where}: no path after {kind}:")
    selection = Selection(text or fields or ("text",), tuple(filters))
    return [Spec(source, kind, pattern, selection, splits, value)]


def _legacy(source: str, path: str, fields) -> Spec:
    fmt = FORMATS.get(data_suffix(path))
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such input file")
    if Path(path).is_dir() or fmt not in ("jsonl", "csv", "parquet", "txt"):
        raise SourceError(
            f"--source {source}={path}: give its kind, e.g. {source}=jsonl:{path} (kinds: {', '.join(KINDS)})"
        )
    return Spec(source, fmt, path, Selection(tuple(fields or ("text",))), raw=path)


def parse_sources(sources: dict[str, list], fields: dict[str, tuple[str, ...]] | None = None) -> list[Spec]:
    """Specs of every source; `fields` (--fields) may name only declared sources."""
    fields = fields or {}
    unknown = sorted(set(fields) - set(sources))
    if unknown:
        raise SourceError(
            f"--fields {unknown[0]}=...: no --source named {unknown[0]!r} (sources: {', '.join(sources)})"
        )
    bad = [name for name in sources if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith(".")]
    if bad:
        raise SourceError(f"--source {bad[0]}=...: a source name is letters, digits, '_', '-' and '.'")
    return [
        spec
        for name, values in sources.items()
        for value in values
        for spec in parse_spec(name, str(value), fields.get(name))
    ]


# --------------------------------------------------------------------------- expanding into units


def _matches(spec: Spec) -> list[Path]:
    if any(c in spec.pattern for c in "*["):
        found = sorted(Path(p) for p in glob.glob(spec.pattern, recursive=True))
        if not found:
            raise FileNotFoundError(f"{spec.pattern}: no files match (--source {spec.source}={spec.raw})")
        return found
    path = Path(spec.pattern)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder (--source {spec.source}={spec.raw})")
    return [path]


def _files_in(folder: Path, formats: set[str]) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".") and FORMATS.get(data_suffix(p)) in formats
    )


def hf_files(folder: Path, splits: tuple[str, ...]) -> list[Path]:
    """The data files of a `datasets` folder, in the dataset's order."""
    if (folder / "dataset_dict.json").exists():
        names = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        missing = [s for s in splits if s not in names]
        if missing:
            raise SourceError(f"{folder}: no split {missing[0]!r}; splits: {', '.join(names)}")
        return [f for s in (splits or names) for f in hf_files(folder / s, ())]
    if splits:
        raise SourceError(f"{folder}: split= needs a DatasetDict folder (with dataset_dict.json)")
    if (folder / "state.json").exists():
        state = json.loads((folder / "state.json").read_text())
        return [folder / f["filename"] for f in state["_data_files"]]
    return _files_in(folder, KIND_FORMATS["hf"])


def _inputs(spec: Spec) -> list[Path]:
    files = []
    for path in _matches(spec):
        if spec.kind == "cxr":
            files.append(path)
        elif path.is_dir():
            files.extend(hf_files(path, spec.splits) if spec.kind == "hf" else _files_in(path, KIND_FORMATS[spec.kind]))
        elif FORMATS.get(data_suffix(path)) in KIND_FORMATS[spec.kind]:
            files.append(path)
        else:
            raise SourceError(f"{path}: not a {spec.kind} file (--source {spec.source}={spec.raw})")
    if not files:
        raise FileNotFoundError(f"{spec.pattern}: no {spec.kind} files there (--source {spec.source}={spec.raw})")
    return files


def _text_files(path: Path) -> list[tuple[str, int, int]]:
    """(member, size, mtime or CRC) of the .txt files of a folder tree or a zip, sorted."""
    if path.is_dir():
        return sorted(
            (p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in path.rglob("*.txt")
            if p.is_file()
        )
    with open_zip(path) as archive:
        return sorted(
            (i.filename, i.file_size, i.CRC)
            for i in archive.infolist()
            if not i.is_dir() and i.filename.endswith(".txt")
        )


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (*COMPRESSED, *FORMATS, ".zip"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "input"


def _fingerprint(spec: Spec, fmt: str, path: Path, members=()) -> dict:
    stat = path.stat()
    digest = hashlib.sha256("\n".join("\t".join(map(str, m)) for m in members).encode()).hexdigest()
    return {
        "input": str(path.resolve()),
        "format": fmt,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "members_sha256": digest if members else None,
        "text": list(spec.selection.text),
        "filters": [f.describe() for f in spec.selection.filters],
    }


def units_of(specs: list[Spec]) -> list[Unit]:
    """Every unit of work, in a fixed order: by source, then spec, then file (then member chunk)."""
    units, counters = [], {}
    for spec in specs:
        for path in _inputs(spec):
            chunks = [None]
            if spec.kind == "cxr":
                members = _text_files(path)
                if not members:
                    raise FileNotFoundError(f"{path}: no .txt files in it (--source {spec.source}={spec.raw})")
                chunks = [members[i : i + FILES_PER_UNIT] for i in range(0, len(members), FILES_PER_UNIT)]
            for c, chunk in enumerate(chunks):
                index = counters.get(spec.source, 0)
                counters[spec.source] = index + 1
                name = f"{index:05d}-{_stem(path)}" + (f"-{c:04d}" if len(chunks) > 1 else "")
                fmt = "files" if chunk is not None else FORMATS[data_suffix(path)]
                size = sum(m[1] for m in chunk) if chunk is not None else path.stat().st_size
                units.append(
                    Unit(
                        spec.source,
                        name,
                        fmt,
                        str(path),
                        spec.selection,
                        tuple(m[0] for m in chunk or ()),
                        size,
                        _fingerprint(spec, fmt, path, chunk or ()),
                    )
                )
    return units


def assign(units: list[Unit], num_shards: int) -> list[list[int]]:
    """Unit indices per host: largest first to the least loaded host (the same answer on every host)."""
    loads = [(0, shard) for shard in range(num_shards)]
    shares: list[list[int]] = [[] for _ in range(num_shards)]
    for index in sorted(range(len(units)), key=lambda i: (-units[i].size, i)):
        load, shard = heapq.heappop(loads)
        shares[shard].append(index)
        heapq.heappush(loads, (load + units[index].size, shard))
    return [sorted(s) for s in shares]
