"""`prepare overlap`: which benchmark test examples share a long n-gram with the training data, and optionally a
copy of the prepared pretraining data without the documents they share it with.

The rule is GPT-3's (Brown et al. 2020, appendix C): text lower-cased, everything but letters and digits turned
into spaces, split into words; an example overlaps when any of its 13-word windows occurs in a training document.
Words rather than tokens make the rule independent of the tokenizer and blind to case, punctuation and spacing,
which copies of a benchmark in a web or PubMed dump differ in; Llama 2's token-level rule (skip-grams allowing
mismatches, over a percentage of the example) needs the raw tokens of both sides and is tuned to their tokenizer.
An example with fewer than n words has no window and counts as clean (reported as `too_short`).

The test side is small: each window of each example is hashed (64 bits from crc32s of its words) into one sorted
array; a hit is confirmed on the words themselves, so a hash collision cannot report an overlap. The training side
is read in pieces of `CHUNK` documents by worker processes (each decodes its documents with the dataset's
tokenizer and looks their windows up by binary search), so memory stays at one document per worker plus the test
windows.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import re
import resource
import shutil
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from mellama_jax.data.corpus import BadRecord
from mellama_jax.data.pretrain import read_manifest
from mellama_jax.data.tokenizer import Tokenizer
from mellama_jax.eval.tasks import load_task, load_templates
from mellama_jax.options import NON_NEGATIVE, POSITIVE, option
from mellama_jax.outputs import atomic_output, check_destination

WORD = re.compile(r"[^\W_]+")  # letters and digits; all else separates words
PRIME = np.uint64(1099511628211)


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def window_hashes(ws: list[str], n: int) -> np.ndarray:
    """A 64-bit hash of each n-word window (a polynomial over the words' crc32s; wraps modulo 2^64)."""
    if len(ws) < n:
        return np.zeros(0, np.uint64)
    ids = np.array([zlib.crc32(w.encode()) for w in ws], np.uint64)
    h = np.zeros(len(ws) - n + 1, np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * PRIME + ids[k : len(ws) - n + 1 + k]
    return h


@dataclasses.dataclass
class TestSide:
    """Every window of every example: hashes (sorted) and, for each hash, the (task, example, words) it came from."""

    n: int
    hashes: np.ndarray
    owners: dict  # hash -> [(task, example index, window words)]


def test_side(examples: dict[str, list[str]], n: int) -> TestSide:
    owners: dict[int, list] = {}
    for task, texts in examples.items():
        for i, text in enumerate(texts):
            ws = words(text)
            for j, h in enumerate(window_hashes(ws, n).tolist()):
                owners.setdefault(h, []).append((task, i, tuple(ws[j : j + n])))
    return TestSide(n, np.array(sorted(owners), np.uint64), owners)


_SIDE: TestSide | None = None
_TOKENIZER = None


def _init(side: TestSide, tokenizer_proto: bytes) -> None:
    global _SIDE, _TOKENIZER

    _SIDE, _TOKENIZER = side, Tokenizer(tokenizer_proto)


CHUNK = 1000  # documents per unit of work, so that one big shard still spreads over the processes


def _token_ids(raw: bytes, dtype: str) -> list[int]:
    """A record's token ids: a pretraining document's tokens, or row 0 of an instruction record (ids, weights,
    segments as int32)."""
    if dtype == "instruct":
        return np.frombuffer(raw, np.int32).reshape(3, -1)[0].tolist()
    return np.frombuffer(raw, dtype).tolist()


def scan_records(path: str, source: str, shard: str, dtype: str, start: int, stop: int) -> tuple[int, list]:
    """(documents read, [(task, example index, source, shard, record)]) for records [start, stop) of a file."""
    side, hits, read = _SIDE, [], 0
    reader = ArrayRecordReader(path)
    stop = min(stop, reader.num_records())
    for record in range(start, stop):
        read += 1
        ws = words(_TOKENIZER.decode(_token_ids(reader.read([record])[0], dtype)))
        h = window_hashes(ws, side.n)
        at = np.minimum(np.searchsorted(side.hashes, h), max(len(side.hashes) - 1, 0))
        found = np.flatnonzero(side.hashes[at] == h) if len(side.hashes) else np.zeros(0, int)
        seen = set()
        for j in found.tolist():
            window = tuple(ws[j : j + side.n])
            for task, i, owner_window in side.owners[int(h[j])]:
                if owner_window == window and (task, i) not in seen:
                    seen.add((task, i))
                    hits.append((task, i, source, shard, record))
    reader.close()
    return read, hits


def _files(data: Path, manifest: dict) -> list[tuple[str, str, str, str, int]]:
    """(path, source, shard, record format, records) of each file of a prepared directory: a pretraining
    dataset's shards, or an instruction dataset's one file (source "instruct")."""
    if manifest.get("format") == "mellama-instruct-v1":
        return [(str(data / "examples.arrayrecord"), "instruct", "examples", "instruct", manifest["rows"])]
    return [
        (
            str(data / source / f"{shard}.arrayrecord"),
            source,
            shard,
            manifest["token_dtype"],
            len(np.load(data / source / f"{shard}.lengths.npy")),
        )
        for source, entry in manifest["sources"].items()
        for shard in entry["shards"]
    ]


@dataclasses.dataclass(frozen=True)
class OverlapRequest:
    """One `prepare overlap` run: what `mellama-jax prepare overlap` parses, and what `find_overlap` takes."""

    data: str | Path = option(help="a `prepare pretrain` or `prepare instruct` output")
    tasks: tuple[str, ...] = option(
        help="repeatable: a task and the file `eval --task TASK --data FILE` reads",
        flag="--task",
        metavar="TASK=FILE",
        append=True,
    )
    out: str | Path = option(help="a new folder for overlap.json")
    splits: tuple[str, ...] = option(
        (), "PubMedQA: its test split's id -> label file", flag="--split", metavar="TASK=FILE", append=True
    )
    prompts: str | Path | None = option(None, "the authors' prompt_templates.json (all tasks but i2b2 and bionli)")
    n: int = option(13, "words per window (default 13, GPT-3's)", type=POSITIVE)
    workers: int = option(0, "processes scanning shards (0: all cores)", type=NON_NEGATIVE)
    filtered_out: str | Path | None = option(None, "also write a copy of --data without the overlapping documents")
    overwrite: bool = option(False, "replace earlier outputs of this command")


def _pairs(items, what: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        if "=" not in item:
            raise BadRecord(f"{what} {item!r}: expected TASK=FILE")
        task, path = item.split("=", 1)
        if task in pairs:
            raise BadRecord(f"{what} {task}: given twice ({pairs[task]}, {path})")
        pairs[task] = path
    return pairs


def task_texts(r: OverlapRequest) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Each task's example texts (its template fields, joined) and ids."""
    templates, splits = load_templates(r.prompts), _pairs(r.splits, "--split")
    texts, ids = {}, {}
    for task, path in _pairs(r.tasks, "--task").items():
        _, examples, _ = load_task(task, path, templates, splits.get(task))
        texts[task] = [" ".join(str(v) for v in e.fields.values()) for e in examples]
        ids[task] = [e.id for e in examples]
    return texts, ids


def _scan(r: OverlapRequest, data: Path, manifest: dict, side: TestSide) -> tuple[dict, list]:
    """Every prepared document scanned against the test side in worker processes: (the report so far, the hits as
    (task, example, source, shard, record))."""
    units = [
        (path, source, shard, kind, start, start + CHUNK)
        for path, source, shard, kind, count in _files(data, manifest)
        for start in range(0, count, CHUNK)
    ]
    workers = r.workers or os.cpu_count() or 1
    started = time.perf_counter()
    documents, hits = 0, []
    with ProcessPoolExecutor(
        workers,
        multiprocessing.get_context("spawn"),
        initializer=_init,
        initargs=(side, (data / "tokenizer.model").read_bytes()),
    ) as pool:
        futures = [pool.submit(scan_records, *unit) for unit in units]
        for future in futures:
            count, found = future.result()
            documents += count
            hits.extend(found)
    seconds = time.perf_counter() - started
    report = {
        "rule": f"GPT-3's: lower-cased words of letters and digits, {r.n}-word windows",
        "n": r.n,
        "data": str(data),
        "documents_scanned": documents,
        "seconds": seconds,
        "documents_per_s": documents / seconds if seconds else None,
        "workers": workers,
        "documents_matched": len({(s, sh, rec) for _, _, s, sh, rec in hits}),
        # peak resident memory of this process and of the largest worker (a worker's figure exists once the
        # pool has ended, here)
        "peak_rss_mib": {
            "main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        },
        "tasks": {},
    }
    return report, hits


def find_overlap(r: OverlapRequest) -> dict:
    if r.n < 1:
        raise BadRecord(f"--n {r.n}: a window needs at least one word")
    data = Path(r.data)
    manifest = read_manifest(data)
    if manifest.get("format") not in ("mellama-pretrain-v1", "mellama-instruct-v1"):
        raise BadRecord(f"{data}/manifest.json: not a `prepare pretrain` or `prepare instruct` output")
    check_destination(r.out, "overlap", r.overwrite, [data])
    if r.filtered_out and manifest["format"] != "mellama-pretrain-v1":
        raise BadRecord(
            f"{data}: --filtered-out copies pretraining data; for instruction data, drop the examples "
            "overlap.json names from the inputs and prepare them again"
        )
    if r.filtered_out:
        check_destination(r.filtered_out, KIND_FILTERED, r.overwrite, [data, r.out])
    texts, ids = task_texts(r)
    report, hits = _scan(r, data, manifest, test_side(texts, r.n))
    files = _pairs(r.tasks, "--task")
    for task, task_ids in ids.items():
        mine = sorted({(i, s, sh, rec) for t, i, s, sh, rec in hits if t == task})
        dirty = sorted({i for i, *_ in mine})
        report["tasks"][task] = {
            "data": files[task],
            "examples": len(task_ids),
            "overlapping": len(dirty),
            "share": len(dirty) / len(task_ids),
            "too_short": sum(len(words(t)) < r.n for t in texts[task]),
            "overlapping_ids": [task_ids[i] for i in dirty],
            "matches": [{"id": task_ids[i], "source": s, "document": f"{s}/{sh}#{rec}"} for i, s, sh, rec in mine],
        }
    with atomic_output(r.out, "overlap", r.overwrite, [data]) as tmp:
        (tmp / "overlap.json").write_text(json.dumps(report, indent=1))
    if r.filtered_out:
        drop = {(s, sh, rec) for _, _, s, sh, rec in hits}
        report["filtered"] = str(write_filtered(data, manifest, drop, r.filtered_out, r.overwrite))
    return report


KIND_FILTERED = "prepare-pretrain"  # the filtered copy is a prepared dataset like any other


def write_filtered(data: Path, manifest: dict, drop: set, out: str | Path, overwrite: bool) -> Path:
    """A copy of the prepared dataset `data` without the records in `drop` ((source, shard, record)); its
    manifest counts what is left and how many documents each source lost (`overlap_removed`). The preparation's
    plan and per-shard reports stay behind: they describe the unfiltered shards, and `prepare merge` or a re-run
    would rebuild the manifest from them."""
    dtype = np.dtype(manifest["token_dtype"])
    manifest = json.loads(json.dumps(manifest))
    with atomic_output(out, KIND_FILTERED, overwrite, [data]) as tmp:
        shutil.copyfile(data / "tokenizer.model", tmp / "tokenizer.model")
        for source, entry in manifest["sources"].items():
            (tmp / source).mkdir()
            removed = tokens = documents = 0
            for shard in entry["shards"]:
                reader = ArrayRecordReader(str(data / source / f"{shard}.arrayrecord"))
                writer = ArrayRecordWriter(str(tmp / source / f"{shard}.arrayrecord"), "group_size:1")
                lengths = []
                for record in range(reader.num_records()):
                    if (source, shard, record) in drop:
                        removed += 1
                        continue
                    raw = reader.read([record])[0]
                    writer.write(raw)
                    lengths.append(len(raw) // dtype.itemsize)
                writer.close()
                reader.close()
                np.save(tmp / source / f"{shard}.lengths.npy", np.array(lengths, np.int32))
                documents, tokens = documents + len(lengths), tokens + sum(lengths)
            entry.update(documents=documents, tokens=tokens, overlap_removed=removed)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return Path(out)
