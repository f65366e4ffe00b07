"""`prepare pretrain`: tokenise local corpora into ArrayRecord shards, one document per record (BOS ... EOS).

Layout of the output directory (read by data/pretrain.py):
  manifest.json                     sources -> shards, token dtype, totals
  tokenizer.model                   the tokenizer used (so training and export agree)
  <source>/<NNNNN>-<stem>.arrayrecord       token ids, little-endian uint16 (vocab <= 65536) or uint32
  <source>/<NNNNN>-<stem>.lengths.npy       tokens per record (random access packing needs no scan)
  <source>/<NNNNN>-<stem>.done.json         written last: the input's fingerprint and the shard's report

One shard per input file, each written to a temporary name and renamed: a re-run skips shards whose input,
tokenizer and fields are unchanged, and an interrupted run leaves no half-written shard behind.
SentencePiece encodes batches of documents on all cores (its own C++ thread pool).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from mellama_jax.data.corpus import Report, read_documents
from mellama_jax.data.tokenizer import Tokenizer

CHUNK = 1024  # documents per encode call


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def _fingerprint(path: Path, tokenizer_sha: str, fields: tuple[str, ...]) -> dict:
    stat = path.stat()
    return {"input": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "tokenizer_sha256": tokenizer_sha, "fields": list(fields)}


def _write_shard(src: Path, dst: Path, tokenizer: Tokenizer, fields, report: Report, threads: int, bar) -> None:
    dtype = token_dtype(tokenizer.vocab_size)
    tmp_records = dst.with_name(dst.name + ".tmp")
    lengths: list[int] = []
    writer = ArrayRecordWriter(str(tmp_records), "group_size:1")
    # Encoding (C++ threads, GIL released) of one chunk overlaps reading and JSON-parsing the next.
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        def encode(texts):
            return tokenizer.sp.Encode(texts, add_bos=True, add_eos=True, num_threads=threads)

        def write(future, size):
            for ids in future.result():
                writer.write(np.asarray(ids, dtype).tobytes())
                lengths.append(len(ids))
            bar.update(size)

        pending, texts, size = None, [], 0
        for _, text in read_documents(src, fields, report):
            texts.append(text)
            size += len(text)
            if len(texts) == CHUNK:
                future = pool.submit(encode, texts)
                if pending:
                    write(*pending)
                pending, texts, size = (future, size), [], 0
        if pending:
            write(*pending)
        if texts:
            write(pool.submit(encode, texts), size)
    except BaseException:
        writer.close()
        tmp_records.unlink(missing_ok=True)
        raise
    finally:
        pool.shutdown()
    writer.close()
    report.documents += len(lengths)
    report.tokens += int(sum(lengths))
    stem = dst.name[: -len(".arrayrecord")]
    tmp_lengths = dst.with_name(stem + ".lengths.tmp.npy")
    np.save(tmp_lengths, np.asarray(lengths, np.int32))
    tmp_records.replace(dst)
    tmp_lengths.replace(dst.with_name(stem + ".lengths.npy"))


def prepare_pretrain(sources: dict[str, list[str | Path]], tokenizer_path: str | Path, out_dir: str | Path,
                     fields: dict[str, tuple[str, ...]] | None = None, strict: bool = False,
                     threads: int | None = None, progress: bool = True) -> dict:
    """Tokenise every input of every source; returns (and writes) the manifest with per-source reports.

    fields: per source, the JSON/Parquet fields joined (by newlines) into a document's text; default ("text",).
    """
    fields = fields or {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.load(tokenizer_path)
    tokenizer.save(out)
    tokenizer_sha = hashlib.sha256(tokenizer.model_proto).hexdigest()
    threads = threads or os.cpu_count() or 1
    inputs = [(name, i, Path(p)) for name, paths in sources.items() for i, p in enumerate(paths)]
    for _, _, path in inputs:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such input file")
    total_bytes = sum(p.stat().st_size for _, _, p in inputs)
    manifest = {"format": "mellama-pretrain-v1", "token_dtype": token_dtype(tokenizer.vocab_size).str,
                "vocab_size": tokenizer.vocab_size, "tokenizer_sha256": tokenizer_sha, "sources": {}}
    # The bar counts characters read against the inputs' bytes: exact for ASCII, close otherwise.
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenising", disable=not progress) as bar:
        for name, index, path in inputs:
            source_dir = out / name
            source_dir.mkdir(exist_ok=True)
            stem = f"{index:05d}-{path.stem}"
            dst = source_dir / f"{stem}.arrayrecord"
            done = source_dir / f"{stem}.done.json"
            source_fields = tuple(fields.get(name, ("text",)))
            fingerprint = _fingerprint(path, tokenizer_sha, source_fields)
            if done.exists() and dst.exists():
                record = json.loads(done.read_text())
                if record["fingerprint"] == fingerprint:
                    bar.update(path.stat().st_size)
                    _add(manifest, name, stem, record["report"])
                    continue
            report = Report(strict=strict)
            _write_shard(path, dst, tokenizer, source_fields, report, threads, bar)
            record = {"fingerprint": fingerprint, "report": report.to_dict()}
            tmp = done.with_name(done.name + ".tmp")
            tmp.write_text(json.dumps(record, indent=1))
            tmp.replace(done)
            _add(manifest, name, stem, record["report"])
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out / "manifest.json")
    return manifest


def _add(manifest: dict, source: str, stem: str, report: dict) -> None:
    entry = manifest["sources"].setdefault(source, {"shards": [], "documents": 0, "tokens": 0, "skipped": 0})
    entry["shards"].append(stem)
    entry["documents"] += report["documents"]
    entry["tokens"] += report["tokens"]
    entry["skipped"] += report["skipped_total"]


def summarize(manifest: dict) -> str:
    lines = []
    for name, entry in manifest["sources"].items():
        lines.append(f"{name}: {len(entry['shards'])} shard(s), {entry['documents']:,} documents, "
                     f"{entry['tokens']:,} tokens, {entry['skipped']:,} skipped")
    return "\n".join(lines)
