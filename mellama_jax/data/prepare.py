"""`prepare pretrain`: tokenise corpora into ArrayRecord shards, one document per record (BOS ... EOS).

Layout of the output directory (read by data/pretrain.py):
  manifest.json                     sources -> shards, token dtype, totals, kept/dropped counts; written last
  plan.json                         the sources and every unit of work with its input's fingerprint
  tokenizer.model                   the tokenizer used (so training and export agree)
  <source>/<NNNNN>-<stem>.arrayrecord       token ids, little-endian uint16 (vocab <= 65536) or uint32
  <source>/<NNNNN>-<stem>.lengths.npy       tokens per record (random access packing needs no scan)
  <source>/<NNNNN>-<stem>.done.json         written last: the unit's fingerprint and report (skips, filters)

One shard per unit of work (an input file, or a chunk of a report tree; sources.py). Units are spread over
processes on this host and over hosts (`num_shards`/`shard_index`, all writing into one shared folder); a
re-run skips units whose shard is done with the same fingerprint, so an interrupted run resumes. When every
unit is done (whichever host finishes last, or `prepare merge`), the manifest is written.
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from mellama_jax import storage
from mellama_jax.data.corpus import BadRecord, Report
from mellama_jax.data.readers import documents
from mellama_jax.data.sources import Unit, assign, parse_sources, units_of
from mellama_jax.data.tokenizer import Tokenizer
from mellama_jax.options import NON_NEGATIVE, POSITIVE, option
from mellama_jax.outputs import MARKER, OutputError, check_destination, output_kind, write_text_atomic

KIND = "prepare-pretrain"
CHUNK = 1024  # documents per encode call at most
CHUNK_CHARS = 1 << 20  # and about this much text: ids come back as Python ints (~36 bytes a token), so a
#                        chunk counted in documents alone grows with the documents (PMC articles: ~50k chars)
SMALL = 16 << 20  # input bytes below which starting worker processes (~1 s) costs more than it saves
_SHARD_FILE = re.compile(r"\d{5}-.*\.(arrayrecord|lengths\.npy|done\.json)")


class Pending(RuntimeError):
    """Not every unit is done yet: other hosts' shares are still running (or were never run)."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


# --------------------------------------------------------------------------- one unit


def _encode_into(texts, tmp: Path, tokenizer: Tokenizer, threads: int) -> array.array:
    """Encode documents a chunk at a time into an ArrayRecord file; returns the tokens per document."""
    dtype = token_dtype(tokenizer.vocab_size)
    lengths = array.array("l")  # 8 bytes a document, however many there are
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    # Encoding (C++ threads, GIL released) of one chunk overlaps reading and parsing the next.
    pool = ThreadPoolExecutor(max_workers=1)

    def encode(batch):
        return tokenizer.sp.Encode(batch, add_bos=True, add_eos=True, num_threads=threads)

    def write(future):
        for ids in future.result():
            writer.write(np.asarray(ids, dtype).tobytes())
            lengths.append(len(ids))

    try:
        pending, batch, chars = None, [], 0
        for _, text in texts:
            batch.append(text)
            chars += len(text)
            if len(batch) == CHUNK or chars >= CHUNK_CHARS:
                future = pool.submit(encode, batch)
                if pending:
                    write(pending)
                pending, batch, chars = future, [], 0
        if pending:
            write(pending)
        if batch:
            write(pool.submit(encode, batch))
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        pool.shutdown()
    writer.close()
    return lengths


def write_unit(unit: Unit, tokenizer: Tokenizer, out: Path, strict: bool, threads: int) -> dict:
    """Tokenise one unit into its shard (each file written under a temporary name and renamed);
    returns its report, which <unit>.done.json also keeps."""
    folder = out / unit.source
    folder.mkdir(exist_ok=True)
    report = Report(strict=strict)
    tmp = folder / f".{unit.name}.arrayrecord.tmp-{os.getpid()}"
    lengths = _encode_into(documents(unit, report), tmp, tokenizer, threads)
    report.documents, report.tokens = len(lengths), int(sum(lengths))
    tmp_lengths = folder / f".{unit.name}.lengths.tmp-{os.getpid()}.npy"
    np.save(tmp_lengths, np.asarray(lengths, np.int32))
    tmp.replace(folder / f"{unit.name}.arrayrecord")
    tmp_lengths.replace(folder / f"{unit.name}.lengths.npy")
    result = report.to_dict()
    write_text_atomic(
        folder / f"{unit.name}.done.json", json.dumps({"fingerprint": unit.fingerprint, "report": result}, indent=1)
    )
    return result


_TOKENIZER: Tokenizer | None = None  # a worker process's own copy


def _init_worker(model_proto: bytes) -> None:
    global _TOKENIZER
    _TOKENIZER = Tokenizer(model_proto)


def _work(unit: Unit, out: str, strict: bool, threads: int) -> dict:
    return write_unit(unit, _TOKENIZER, Path(out), strict, threads)


def run_units(units: list[Unit], tokenizer: Tokenizer, out: Path, strict: bool, workers: int, threads: int):
    """(unit, report) as each unit finishes; several units at once in `workers` processes (reading,
    decompressing and parsing are Python, so threads alone would leave cores idle)."""
    if workers <= 1:
        for unit in units:
            yield unit, write_unit(unit, tokenizer, out, strict, threads)
        return
    # spawn, not fork: the parent may hold JAX's or tqdm's threads, which a fork would copy mid-flight.
    pool = ProcessPoolExecutor(
        workers, multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=(tokenizer.model_proto,)
    )
    try:
        futures = {pool.submit(_work, u, str(out), strict, threads): u for u in units}
        for future in as_completed(futures):
            yield futures[future], future.result()
    finally:
        pool.shutdown(cancel_futures=True)


# --------------------------------------------------------------------------- plan and destination


def _plan(specs, units: list[Unit], tokenizer: Tokenizer, sha: str) -> dict:
    sources: dict[str, dict] = {}
    for spec in specs:
        entry = sources.setdefault(spec.source, {"inputs": [], "specs": [], "text_fields": [], "filter_fields": []})
        entry["inputs"].append(f"{spec.kind}:{spec.pattern}")
        entry["specs"].append(spec.raw)
        entry["text_fields"] = list(dict.fromkeys(entry["text_fields"] + list(spec.selection.text)))
        entry["filter_fields"] = list(dict.fromkeys(entry["filter_fields"] + [f.field for f in spec.selection.filters]))
    return {
        "format": "mellama-pretrain-plan-v1",
        "token_dtype": token_dtype(tokenizer.vocab_size).str,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_sha256": sha,
        "sources": sources,
        "units": [{"source": u.source, "name": u.name, "size": u.size, "fingerprint": u.fingerprint} for u in units],
    }


def _read_plan(out: Path) -> dict | None:
    try:
        return json.loads((out / "plan.json").read_text())
    except (OSError, ValueError):
        return None


def _inputs(plan: dict) -> dict:
    return {name: entry["inputs"] for name, entry in plan["sources"].items()}


def open_destination(out: Path, plan: dict, overwrite: bool, inputs) -> list[Path]:
    """Check `out` (new, or an earlier prepare of the same sources, or with `overwrite` of other ones) and
    clear what the plan no longer lists; returns the folders this call creates (removed again on failure)."""
    if not out.is_dir() or not any(out.iterdir()):
        check_destination(out, KIND, False, inputs)  # (a file there is refused)
        created = [p for p in (out, *out.parents) if not p.exists()]
        out.mkdir(parents=True, exist_ok=True)
        return created
    check_destination(out, KIND, True, inputs)  # refuses anything but an earlier prepare's folder
    old = _read_plan(out)
    if old and _inputs(old) != _inputs(plan):
        if not overwrite:
            raise OutputError(
                f"{out}: holds data prepared from other sources ({', '.join(old['sources'])}: "
                f"{_inputs(old)}); choose a new folder or --overwrite to replace it"
            )
        for name in set(old["sources"]) - set(plan["sources"]):
            shutil.rmtree(out / name, ignore_errors=True)
    planned = {(u["source"], u["name"]) for u in plan["units"]}
    for name in plan["sources"]:
        for f in (out / name).glob("*") if (out / name).is_dir() else ():
            match = _SHARD_FILE.fullmatch(f.name)
            if match and (name, f.name[: -len(match[1]) - 1]) not in planned:
                f.unlink()  # a shard of an input no longer in the source
    return []


def _reusable(report: dict | None, strict: bool) -> bool:
    """A finished unit is reused, unless --strict now asks to fail on the bad rows it skipped."""
    return report is not None and not (strict and report["skipped_total"])


def _is_done(out: Path, unit: dict) -> dict | None:
    """The unit's report if its shard is complete with this fingerprint."""
    folder = out / unit["source"]
    try:
        record = json.loads((folder / f"{unit['name']}.done.json").read_text())
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != unit["fingerprint"] or not (folder / f"{unit['name']}.arrayrecord").exists():
        return None
    return record["report"]


# --------------------------------------------------------------------------- the command


def _sources(items: list[str]) -> dict[str, list[str]]:
    """--source values -> {name: [spec, ...]}."""
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise ValueError(f"--source {item!r} is not of the form NAME=KIND:PATH[?OPTIONS] or NAME=FILE[,FILE]")
        out.setdefault(name, []).append(spec)
    return out


def _fields(items: list[str] | None) -> dict[str, tuple[str, ...]]:
    """--fields values -> {source: (field, ...)}."""
    out: dict[str, list[str]] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--fields {item!r} is not of the form NAME=VALUE[,VALUE...]")
        name, values = item.split("=", 1)
        out.setdefault(name, []).extend(v for v in values.split(",") if v)
    return {k: tuple(v) for k, v in out.items()}


@dataclasses.dataclass(frozen=True)
class PretrainDataRequest:
    """One `prepare pretrain` (this host's share): what `mellama-jax prepare pretrain` parses, and what
    `prepare_pretrain` takes."""

    # per name, its --source values (`KIND:PATH?OPTIONS` specs, or files; sources.py)
    sources: dict[str, list] = option(
        help="NAME=KIND:PATH[?OPTIONS] or NAME=FILE[,FILE...], repeatable, e.g. "
        "biomedical=pile:/data/pile/*.jsonl.zst?subset=PubMed+Central,PubMed+Abstracts",
        flag="--source",
        metavar="SOURCE",
        append=True,
        collect=_sources,
    )
    tokenizer: str | Path = option(help="tokenizer.model or a directory holding it")
    out: str | Path = option()
    # per source, the text fields of specs that give none
    fields: dict[str, tuple[str, ...]] | None = option(
        None,
        "NAME=FIELD[,FIELD...] text fields of a source (joined by newlines; default: text; or ?text= in its spec)",
        append=True,
        collect=_fields,
    )
    strict: bool = option(False, "fail on the first bad record instead of skipping it")
    threads: int | None = option(None, "encoding threads per process (default: cores / processes)", type=POSITIVE)
    workers: int | None = option(
        None, "processes, one unit (file) each at a time (default: all cores; 1 under 16 MB of input)", type=POSITIVE
    )
    num_shards: int = option(1, "hosts sharing the work (by input file)", type=POSITIVE)
    shard_index: int = option(0, "this host's share, 0..num-shards-1", type=NON_NEGATIVE)
    overwrite: bool = option(
        False, "replace an earlier prepare of other sources in --out (its stale source folders are removed)"
    )


def encode_threads(workers: int, threads: int | None = None) -> int:
    """Encode threads per process: `threads`, or by default this machine's cores shared among the processes."""
    return threads or max(1, (os.cpu_count() or 1) // workers)


def prepare_pretrain(r: PretrainDataRequest, *, progress: bool = True) -> dict | None:
    """Tokenise this host's share of every source's units; returns the manifest once every unit is done
    (None while other hosts' shares are still missing)."""
    if r.num_shards < 1:
        raise ValueError(f"--num-shards {r.num_shards}: must be at least 1")
    if not 0 <= r.shard_index < r.num_shards:
        raise ValueError(f"--shard-index {r.shard_index} is not in 0..{r.num_shards - 1} (--num-shards {r.num_shards})")
    if storage.is_remote(r.out):  # it resumes unit by unit in its folder, which a bucket cannot hold in place
        raise OutputError(
            f"{r.out}: prepare writes a local folder; copy it to the bucket when it is done "
            "(gcloud storage cp -r), and train with data.path on the bucket"
        )
    out = Path(r.out)
    specs = parse_sources(r.sources, r.fields)
    tokenizer = Tokenizer.load(r.tokenizer)
    sha = hashlib.sha256(tokenizer.model_proto).hexdigest()
    units = [dataclasses.replace(u, fingerprint=dict(u.fingerprint, tokenizer_sha256=sha)) for u in units_of(specs)]
    plan = _plan(specs, units, tokenizer, sha)
    created = open_destination(out, plan, r.overwrite, [u.path for u in units])
    kept = 0
    try:
        write_text_atomic(out / MARKER, json.dumps({"kind": KIND}))
        write_text_atomic(out / "plan.json", json.dumps(plan, indent=1))
        tokenizer.save(out)
        todo = sorted(
            (
                units[i]
                for i in assign(units, r.num_shards)[r.shard_index]
                if not _reusable(_is_done(out, plan["units"][i]), r.strict)
            ),
            key=lambda u: -u.size,
        )
        if todo:  # shards are about to change: the manifest is rewritten once every unit is done again
            (out / "manifest.json").unlink(missing_ok=True)
        cores = os.cpu_count() or 1
        workers = r.workers or (cores if sum(u.size for u in todo) >= SMALL else 1)
        workers = max(1, min(workers, len(todo)))
        with tqdm(
            total=sum(u.size for u in todo), unit="B", unit_scale=True, desc="tokenising", disable=not progress
        ) as bar:
            for unit, report in run_units(todo, tokenizer, out, r.strict, workers, encode_threads(workers, r.threads)):
                kept += report["documents"]
                bar.update(unit.size)
        return merge(out) if r.num_shards == 1 or _all_done(out, plan) else None
    except BaseException:
        if created and not kept:  # nothing worth resuming: leave no trace (no tokenizer, no empty folders)
            shutil.rmtree(out, ignore_errors=True)
            for folder in created[1:]:
                _rmdir(folder)
        raise


def _rmdir(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _all_done(out: Path, plan: dict) -> bool:
    return all(_is_done(out, u) is not None for u in plan["units"])


def merge(out_dir: str | Path) -> dict:
    """Write manifest.json from every unit's report, once all are done (`prepare merge`)."""
    out = Path(out_dir)
    plan = _read_plan(out)
    if plan is None or output_kind(out) != KIND:
        raise FileNotFoundError(f"{out}: no plan.json of `prepare pretrain` here")
    tokenizer = out / "tokenizer.model"
    if not tokenizer.exists() or hashlib.sha256(tokenizer.read_bytes()).hexdigest() != plan["tokenizer_sha256"]:
        raise BadRecord(f"{tokenizer}: missing or not the tokenizer the plan was made with; re-run prepare")
    reports = [(u, _is_done(out, u)) for u in plan["units"]]
    missing = [f"{u['source']}/{u['name']}" for u, r in reports if r is None]
    if missing:
        raise Pending(
            f"{out}: {len(missing)} of {len(reports)} units are not prepared yet (e.g. {missing[0]}); "
            f"run the remaining --shard-index values, then `mellama-jax prepare merge --out {out}`"
        )
    manifest = {
        "format": "mellama-pretrain-v1",
        "token_dtype": plan["token_dtype"],
        "vocab_size": plan["vocab_size"],
        "tokenizer_sha256": plan["tokenizer_sha256"],
        "sources": {},
    }
    for name, entry in plan["sources"].items():
        manifest["sources"][name] = _source_entry(entry, [(u["name"], r) for u, r in reports if u["source"] == name])
    problems = [p for name, entry in manifest["sources"].items() for p in _problems(name, entry)]
    if problems:
        raise BadRecord("; ".join(problems))
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


def _source_entry(plan_entry: dict, reports: list[tuple[str, dict]]) -> dict:
    total = Report()
    for _, r in reports:
        total.documents += r["documents"]
        total.tokens += r["tokens"]
        total.skipped.update(r["skipped"])
        total.filtered.update(r.get("filtered", {}))
        total.fields_seen.update(r.get("fields_seen", []))
        total.locations.extend(r["skipped_examples"][: max(0, 20 - len(total.locations))])
    return {
        "shards": [name for name, _ in reports],
        "documents": total.documents,
        "tokens": total.tokens,
        "skipped": sum(total.skipped.values()),
        "skipped_by_reason": dict(total.skipped),
        "skipped_examples": total.locations,
        "filtered": dict(total.filtered),
        "filtered_total": sum(total.filtered.values()),
        "specs": plan_entry["specs"],
        "text_fields": plan_entry["text_fields"],
        "filter_fields": plan_entry["filter_fields"],
        "fields_seen": sorted(total.fields_seen),
    }


def _problems(name: str, entry: dict) -> list[str]:
    """What makes a source unusable: a field that occurs in no row, or no document at all. (Filters run
    first, so text fields are judged only when some row got past them.)"""
    seen = set(entry["fields_seen"])
    never = [f for f in entry["filter_fields"] if f not in seen]
    if not never and not entry["documents"] and "missing field" in entry["skipped_by_reason"]:
        never = [f for f in entry["text_fields"] if f not in seen]
    if never:
        return [
            f"source {name}: field {never[0]!r} occurs in no row of its {len(entry['shards'])} input(s) "
            f"(--source {name}={' '.join(entry['specs'])})"
        ]
    if not entry["documents"]:
        return [f"source {name}: no documents ({_why(entry)})"]
    return []


def _why(entry: dict) -> str:
    parts = [f"{k}: {v:,}" for k, v in sorted(entry["skipped_by_reason"].items())]
    parts += [f"dropped by filter {k}: {v:,}" for k, v in sorted(entry["filtered"].items(), key=lambda kv: -kv[1])[:5]]
    return ", ".join(parts) or "its inputs hold no rows"


def summarize(manifest: dict, examples: int = 3) -> str:
    lines = []
    for name, entry in manifest["sources"].items():
        lines.append(
            f"{name}: {len(entry['shards'])} shard(s), {entry['documents']:,} documents, "
            f"{entry['tokens']:,} tokens, {entry['skipped']:,} skipped"
            + (f", {entry.get('filtered_total', 0):,} dropped by filters" if entry.get("filtered") else "")
        )
        if entry.get("skipped") or entry.get("filtered"):
            lines.append(f"  {_why(entry)}")
        lines += [f"  skipped {where}" for where in entry.get("skipped_examples", [])[:examples]]
    return "\n".join(lines)
