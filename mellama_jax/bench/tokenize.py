"""`bench tokenize`: `prepare pretrain` on plain and compressed JSONL with 1..N processes, against a plain
single-process SentencePiece loop over the same documents already decompressed in memory; and
(`--stream-gb`) the peak memory of `prepare` on a multi-GB compressed Pile-like shard."""

from __future__ import annotations

import base64
import dataclasses
import gzip
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zstandard

from mellama_jax.data.corpus import Report
from mellama_jax.data.prepare import PretrainDataRequest, encode_threads, prepare_pretrain
from mellama_jax.data.readers import documents
from mellama_jax.data.sources import parse_sources, units_of
from mellama_jax.data.tokenizer import Tokenizer
from mellama_jax.options import POSITIVE, name_list, option, positive_list, threads_list


def _texts(corpus: str | Path, fields: tuple[str, ...]) -> list[str]:
    units = units_of(parse_sources({"corpus": [str(corpus)]}, {"corpus": fields}))
    return [text for unit in units for _, text in documents(unit, Report())]


def _write(folder: Path, texts: list[str], files: int, suffix: str) -> None:
    """The documents as `files` JSONL files (one unit of work each), compressed by `suffix`."""
    folder.mkdir()
    for k in range(files):
        data = "".join(json.dumps({"text": t}) + "\n" for t in texts[k::files]).encode()
        if suffix.endswith(".gz"):
            data = gzip.compress(data, compresslevel=6)
        elif suffix.endswith(".zst"):
            data = zstandard.ZstdCompressor(level=3).compress(data)
        (folder / f"part{k:03d}.{suffix}").write_bytes(data)


def _time_prepare(folder: Path, tokenizer, out: Path, workers: int, threads: int | None) -> tuple[float, int]:
    start = time.perf_counter()
    request = PretrainDataRequest({"corpus": [f"jsonl:{folder}"]}, tokenizer, out, workers=workers, threads=threads)
    manifest = prepare_pretrain(request, progress=False)
    return time.perf_counter() - start, manifest["sources"]["corpus"]["tokens"]


@dataclasses.dataclass(frozen=True)
class TokenizeBenchRequest:
    """One `bench tokenize` run: what `mellama-jax bench tokenize` parses, and what `bench_tokenize` takes."""

    tokenizer: str | Path = option()  # tokenizer.model or a folder holding it
    corpus: str | Path | None = option(None, "a JSONL/txt/Parquet corpus")  # not read with stream_gb
    fields: tuple[str, ...] = option(("text",), type=name_list)  # its text fields, joined by newlines
    # start-up must not dominate
    repeat: int = option(8, "repeat the corpus to reach a few MB", type=POSITIVE)
    formats: tuple[str, ...] = option(
        ("jsonl", "jsonl.gz", "jsonl.zst"), "input forms to time (JSONL only)", type=name_list
    )
    workers: tuple[int, ...] = option((1, 2), "process counts to time", type=positive_list)
    threads: tuple[int | None, ...] = option(
        (None,),
        "encode threads per process to time (auto: the cores shared among the processes; 1: scaling by processes)",
        type=threads_list,
    )
    rounds: int = option(3, "interleaved repetitions; the best of each is kept", type=POSITIVE)
    stream_gb: float = option(
        0, "instead: peak RSS of prepare on a synthetic Pile-like .jsonl.zst of this many GB", type=float
    )
    workdir: str | None = option(None, "where the temporary files go (default: the system's temp folder)")


def bench_tokenize(r: TokenizeBenchRequest) -> dict:
    """Best of `rounds` interleaved timings of each (format, processes, encode threads per process; None:
    prepare's default, the cores shared among the processes), as a shared machine's load comes and goes.
    Threads 1 gives the scaling with processes alone. With stream_gb, `bench_stream_memory` instead."""
    if r.stream_gb:
        return bench_stream_memory(r)
    if r.corpus is None:
        raise ValueError("bench tokenize: give --corpus (the documents to time) or --stream-gb (a memory run)")
    runs = itertools.product(r.formats, r.workers, r.threads)
    keys = list(dict.fromkeys((fmt, w, encode_threads(w, t)) for fmt, w, t in runs))
    texts = _texts(r.corpus, r.fields) * r.repeat  # a few MB, so timings are not dominated by start-up
    tok = Tokenizer.load(r.tokenizer)
    best: dict = {}
    with tempfile.TemporaryDirectory(dir=r.workdir) as tmp:
        for fmt in r.formats:
            _write(Path(tmp) / fmt, texts, 4 * max(r.workers), fmt)
        for n in range(r.rounds):
            start = time.perf_counter()
            tokens = sum(len(tok.sp.EncodeAsIds(text)) + 2 for text in texts)
            best["baseline"] = min(best.get("baseline", 1e9), time.perf_counter() - start)
            for key in keys:
                fmt, w, t = key
                seconds, got = _time_prepare(Path(tmp) / fmt, r.tokenizer, Path(tmp) / f"out-{fmt}-{w}-{t}-{n}", w, t)
                assert got == tokens, (key, got, tokens)
                best[key] = min(best.get(key, 1e9), seconds)
    runs = [
        {
            "format": fmt,
            "workers": w,
            "threads": t,
            "seconds": round(best[fmt, w, t], 2),
            "tokens_per_s": round(tokens / best[fmt, w, t]),
            "speedup": round(best["baseline"] / best[fmt, w, t], 2),
        }
        for fmt, w, t in keys
    ]
    return {
        "benchmark": "tokenize",
        "corpus": str(r.corpus),
        "documents": len(texts),
        "tokens": tokens,
        "text_bytes": sum(len(t.encode()) for t in texts),
        "cores": os.cpu_count() or 1,
        "rounds": r.rounds,
        "load_average": os.getloadavg(),
        "baseline_tokens_per_s": round(tokens / best["baseline"]),
        "runs": runs,
        "note": "prepare reads, decompresses, parses, encodes and writes ArrayRecord shards; the baseline only "
        "encodes text already in memory, one EncodeAsIds call per document",
    }


def write_pile_shard(path: Path, gigabytes: float, selected_every: int = 100) -> dict:
    """A Pile-like .jsonl.zst of about `gigabytes` compressed: rows of random (incompressible) base64 text,
    one in `selected_every` labelled PubMed Central, the rest Pile-CC."""
    rows = selected = 0
    with open(path, "wb") as f, zstandard.ZstdCompressor(level=1).stream_writer(f) as z:
        while f.tell() < gigabytes * 1e9:
            lines = []
            for _ in range(1000):
                name = "PubMed Central" if rows % selected_every == 0 else "Pile-CC"
                selected += name == "PubMed Central"
                text = base64.b64encode(os.urandom(3000)).decode()
                lines.append(json.dumps({"text": text, "meta": {"pile_set_name": name}}) + "\n")
                rows += 1
            z.write("".join(lines).encode())
    return {"rows": rows, "selected": selected, "compressed_bytes": path.stat().st_size}


def _prepare_rss(shard: Path, tokenizer: str | Path, out: Path) -> dict:
    """Peak RSS of `prepare pretrain` (one process) on the shard, in its own process."""
    spec = f"pile=pile:{shard}?subset=PubMed+Central"
    command = [
        sys.executable,
        "-m",
        "mellama_jax.cli",
        "prepare",
        "pretrain",
        "--source",
        spec,
        "--tokenizer",
        str(tokenizer),
        "--out",
        str(out),
        "--workers",
        "1",
    ]
    log = out.with_suffix(".log")
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak RSS (ru_maxrss, KiB)
    seconds = time.perf_counter() - start
    if status or not (out / "manifest.json").exists():
        raise RuntimeError(f"prepare failed: {log.read_text()[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())["sources"]["pile"]
    return {
        "peak_rss_mb": round(usage.ru_maxrss / 1024),
        "seconds": round(seconds, 1),
        "documents": manifest["documents"],
        "tokens": manifest["tokens"],
        "dropped": manifest["filtered_total"],
    }


def bench_stream_memory(r: TokenizeBenchRequest) -> dict:
    """Peak RSS on a small and on an `r.stream_gb` shard: streaming means the two are about the same."""
    result = {"benchmark": "tokenize-stream-memory"}
    with tempfile.TemporaryDirectory(dir=r.workdir) as tmp:
        for label, size in (("small", r.stream_gb / 10), ("large", r.stream_gb)):
            shard = Path(tmp) / f"{label}.jsonl.zst"
            written = write_pile_shard(shard, size)
            result[label] = dict(written, **_prepare_rss(shard, r.tokenizer, Path(tmp) / f"out-{label}"))
            assert result[label]["documents"] == written["selected"], result[label]
            shard.unlink()
    return result
