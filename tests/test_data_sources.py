"""`prepare pretrain` on the paper's corpora as they ship, built small and synthetic in each real layout: The
Pile's mixed-subset .jsonl.zst, MIMIC's NOTEEVENTS.csv.gz (quoted multi-line notes, categories), MIMIC-CXR's
report tree and its zip, a `datasets` folder. Each output is checked against an independent reading of the
same files (the standard library, zstandard's one-shot decoder, `datasets`) and an independent SentencePiece
count; corrupt inputs are reported where they break and cost nothing else."""

import csv
import gzip
import io
import json
import zipfile
import zlib
from collections import Counter

import numpy as np
import pytest
import sentencepiece as spm
import zstandard
from array_record.python.array_record_module import ArrayRecordReader
from data_helpers import WORDS, tiny_tokenizer

from mellama_jax.data import sources
from mellama_jax.data.corpus import BadRecord
from mellama_jax.data.prepare import PretrainDataRequest, merge, prepare_pretrain
from mellama_jax.data.sources import Filter, SourceError, assign, parse_sources, units_of
from mellama_jax.data.streams import ArchiveError
from mellama_jax.outputs import OutputError

SUBSETS = ["PubMed Central", "PubMed Abstracts", "Pile-CC", "Github", "ArXiv"]
CATEGORIES = ["Discharge summary", "Nursing", "Radiology", "Physician ", "ECG"]  # MIMIC-III keeps the space


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def words(rng, lo=2, hi=30):
    vocab = WORDS["biomedical"] + WORDS["clinical"]
    return " ".join(rng.choice(vocab, int(rng.integers(lo, hi))))


def expected(tok, texts) -> Counter:
    """Documents as BOS + ids + EOS, encoded by SentencePiece itself, one text at a time."""
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    return Counter(tuple([sp.bos_id(), *sp.EncodeAsIds(t), sp.eos_id()]) for t in texts)


def written(out, source) -> Counter:
    manifest = json.loads((out / "manifest.json").read_text())
    dtype = np.dtype(manifest["token_dtype"])
    docs = Counter()
    for shard in manifest["sources"][source]["shards"]:
        reader = ArrayRecordReader(str(out / source / f"{shard}.arrayrecord"))
        docs.update(tuple(np.frombuffer(r, dtype).tolist()) for r in reader.read_all())
        reader.close()
    return docs


def check(out, source, tok, texts, manifest):
    want = expected(tok, texts)
    assert written(out, source) == want
    entry = manifest["sources"][source]
    assert entry["documents"] == len(texts)
    assert entry["tokens"] == sum(len(d) * n for d, n in want.items())


# --------------------------------------------------------------------------- The Pile


def pile_rows(rng, n):
    return [{"text": words(rng), "meta": {"pile_set_name": SUBSETS[int(rng.integers(len(SUBSETS)))]}} for _ in range(n)]


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_pile_subsets_from_zstd_shards(tmp_path, tok):
    rng = np.random.default_rng(0)
    shards = [pile_rows(rng, 300), pile_rows(rng, 200)]
    (tmp_path / "pile").mkdir()
    (tmp_path / "pile" / "00.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(shards[0])))
    # Two frames back to back, as `zstd` writes a file it compressed in parts.
    half = len(shards[1]) // 2
    (tmp_path / "pile" / "01.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(jsonl(shards[1][:half]))
        + zstandard.ZstdCompressor().compress(jsonl(shards[1][half:]))
    )
    spec = f"pile:{tmp_path}/pile/*.jsonl.zst?subset=PubMed+Central,PubMed+Abstracts"
    m = prepare_pretrain(PretrainDataRequest({"bio": [spec]}, tok, tmp_path / "out"), progress=False)

    rows = [
        json.loads(line)
        for p in sorted((tmp_path / "pile").iterdir())  # frames decoded one by one
        for frame in _frames(p.read_bytes())
        for line in frame.splitlines()
    ]
    keep = [r["text"] for r in rows if r["meta"]["pile_set_name"] in ("PubMed Central", "PubMed Abstracts")]
    check(tmp_path / "out", "bio", tok, keep, m)
    dropped = Counter(
        f"meta.pile_set_name={r['meta']['pile_set_name']}"
        for r in rows
        if r["meta"]["pile_set_name"] not in ("PubMed Central", "PubMed Abstracts")
    )
    assert m["sources"]["bio"]["filtered"] == dict(dropped) and len(m["sources"]["bio"]["shards"]) == 2
    assert m["sources"]["bio"]["skipped"] == 0


def _frames(data: bytes):
    while data:
        d = zstandard.ZstdDecompressor().decompressobj()
        yield d.decompress(data)
        data = d.unused_data


def test_truncated_and_broken_streams_lose_only_what_is_broken(tmp_path, tok):
    rng = np.random.default_rng(1)
    rows = [{"text": words(rng, 20, 60)} for _ in range(400)]
    data = jsonl(rows)
    zst, gz = zstandard.ZstdCompressor().compress(data), gzip.compress(data)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl.zst").write_bytes(zst[: len(zst) * 2 // 3])
    (tmp_path / "in" / "b.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    (tmp_path / "in" / "c.jsonl").write_bytes(
        b'{"text": "insulin receptor"}\n{"text": \n{"text": "  "}\n{"text": "kinase"}\n'
    )
    m = prepare_pretrain(PretrainDataRequest({"s": [f"jsonl:{tmp_path}/in"]}, tok, tmp_path / "out"), progress=False)

    # What an independent decoder recovers from each cut file: its complete lines.
    got_zst = zstandard.ZstdDecompressor().decompressobj().decompress(zst[: len(zst) * 2 // 3])
    got_gz = zlib.decompressobj(wbits=31).decompress(gz[: len(gz) // 2])
    complete = [got.rsplit(b"\n", 1)[0].splitlines() for got in (got_zst, got_gz)]
    texts = [json.loads(line)["text"] for lines in complete for line in lines] + ["insulin receptor", "kinase"]
    check(tmp_path / "out", "s", tok, texts, m)
    entry = m["sources"]["s"]
    assert entry["skipped_by_reason"] == {"truncated stream": 2, "invalid JSON": 1, "empty text": 1}
    report = "\n".join(entry["skipped_examples"])
    for name, lines in zip(("a.jsonl.zst", "b.jsonl.gz"), complete):
        assert f"{tmp_path}/in/{name}:{len(lines) + 1}: truncated stream" in report
    assert f"{tmp_path}/in/c.jsonl:2: invalid JSON" in report
    with pytest.raises(BadRecord, match=r"a\.jsonl\.zst:\d+: truncated stream"):
        prepare_pretrain(
            PretrainDataRequest({"s": [f"jsonl:{tmp_path}/in/a.jsonl.zst"]}, tok, tmp_path / "strict", strict=True),
            progress=False,
        )
    assert not (tmp_path / "strict").exists()  # nothing worth resuming: no tokenizer, no empty folders
    with pytest.raises(BadRecord, match="truncated stream"):  # --strict does not reuse shards with skips
        prepare_pretrain(
            PretrainDataRequest({"s": [f"jsonl:{tmp_path}/in"]}, tok, tmp_path / "out", strict=True), progress=False
        )


# --------------------------------------------------------------------------- MIMIC notes (CSV)


def mimic_rows(rng, n):
    rows = []
    for i in range(n):
        lines = [words(rng) for _ in range(int(rng.integers(1, 5)))]
        text = "\n".join(lines) + ('\nsaid "no pain", stable' if i % 3 == 0 else "")
        rows.append(
            {
                "ROW_ID": str(i + 1),
                "SUBJECT_ID": str(1000 + i),
                "CATEGORY": CATEGORIES[i % len(CATEGORIES)],
                "ISERROR": "",
                "TEXT": text,
            }
        )
    return rows


def write_csv(path, rows):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    data = buffer.getvalue().encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def test_mimic_notes_csv_gz_where_category(tmp_path, tok):
    rows = mimic_rows(np.random.default_rng(2), 120)
    write_csv(tmp_path / "NOTEEVENTS.csv.gz", rows)
    spec = f"csv:{tmp_path}/NOTEEVENTS.csv.gz?text=TEXT&where=CATEGORY!=Discharge+summary"
    m = prepare_pretrain(PretrainDataRequest({"clinical": [spec]}, tok, tmp_path / "out"), progress=False)
    with gzip.open(tmp_path / "NOTEEVENTS.csv.gz", "rt", newline="") as f:
        read = list(csv.DictReader(f))
    assert len(read) == 120
    check(tmp_path / "out", "clinical", tok, [r["TEXT"] for r in read if r["CATEGORY"] != "Discharge summary"], m)
    assert m["sources"]["clinical"]["filtered"] == {"CATEGORY=Discharge summary": 24}
    # `=` keeps the listed values; a value's trailing space (MIMIC's "Physician ") is trimmed to compare.
    spec = f"csv:{tmp_path}/NOTEEVENTS.csv.gz?text=TEXT&where=CATEGORY=Physician,ECG"
    m = prepare_pretrain(PretrainDataRequest({"clinical": [spec]}, tok, tmp_path / "out2"), progress=False)
    chosen = [r["TEXT"] for r in read if r["CATEGORY"].strip() in ("Physician", "ECG")]
    check(tmp_path / "out2", "clinical", tok, chosen, m)


def csv_line(row) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, quoting=csv.QUOTE_ALL, lineterminator="\n").writerow(row)
    return buffer.getvalue()


def test_csv_unterminated_quote_costs_one_row(tmp_path, tok):
    rows = mimic_rows(np.random.default_rng(3), 12)
    rows[7]["TEXT"] = "   "  # an empty note
    broken = {4, 11}  # the opening quote of these notes is never closed (the second at the end of the file)
    parts = [csv_line(rows[0].keys())]
    starts = {}
    for i, row in enumerate(rows):
        starts[i] = "".join(parts).count("\n") + 1
        parts.append(
            f'"{i + 1}","{1000 + i}","Nursing","","unterminated note {i}\n' if i in broken else csv_line(row.values())
        )
    (tmp_path / "bad.csv").write_text("".join(parts))
    m = prepare_pretrain(
        PretrainDataRequest({"c": [f"csv:{tmp_path}/bad.csv?text=TEXT"]}, tok, tmp_path / "out"), progress=False
    )
    keep = [r["TEXT"] for i, r in enumerate(rows) if i not in broken and i != 7]
    check(tmp_path / "out", "c", tok, keep, m)
    entry = m["sources"]["c"]
    assert entry["skipped_by_reason"] == {"malformed CSV row": 2, "empty text": 1}
    for i in sorted(broken):
        assert any(
            e.startswith(f"{tmp_path}/bad.csv:{starts[i]}: malformed CSV row") for e in entry["skipped_examples"]
        ), (starts[i], entry["skipped_examples"])
    assert any(e.startswith(f"{tmp_path}/bad.csv:{starts[7]}: empty text") for e in entry["skipped_examples"])


# --------------------------------------------------------------------------- MIMIC-CXR reports


def test_cxr_report_tree_and_its_zip(tmp_path, tok, monkeypatch):
    rng = np.random.default_rng(4)
    root = tmp_path / "mimic-cxr-reports"
    texts = {}
    for p in ("p10/p10000032", "p10/p10000764", "p11/p11000011"):
        for _ in range(3):
            path = root / "files" / p / f"s5{int(rng.integers(10**7)):07d}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            texts[path] = f"                                 FINAL REPORT\n EXAMINATION: CHEST\n\n {words(rng)}\n"
            path.write_text(texts[path])
    (root / "files" / "index.html").write_text("<html>")  # not a report
    with zipfile.ZipFile(tmp_path / "mimic-cxr-reports.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(root.rglob("*")):
            z.write(path, path.relative_to(tmp_path))
    monkeypatch.setattr(sources, "FILES_PER_UNIT", 4)  # 9 reports -> units of 4, 4, 1
    reports = {"tree": [f"cxr:{root}"], "zipped": [f"cxr:{tmp_path}/mimic-cxr-reports.zip"]}
    m = prepare_pretrain(PretrainDataRequest(reports, tok, tmp_path / "out"), progress=False)
    for source in ("tree", "zipped"):
        check(tmp_path / "out", source, tok, [t.strip() for t in texts.values()], m)
        assert len(m["sources"][source]["shards"]) == 3
    cut = (tmp_path / "mimic-cxr-reports.zip").read_bytes()
    (tmp_path / "cut.zip").write_bytes(cut[: len(cut) - 30])
    with pytest.raises(ArchiveError, match=f"{tmp_path}/cut.zip: truncated or not a zip"):
        prepare_pretrain(
            PretrainDataRequest({"z": [f"cxr:{tmp_path}/cut.zip"]}, tok, tmp_path / "out-cut"), progress=False
        )


# --------------------------------------------------------------------------- datasets folders


def test_datasets_saved_folder_and_parquet_folder(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(5)
    records = {"text": [words(rng) for _ in range(90)], "source": [["pubmed", "web"][i % 2] for i in range(90)]}
    ds = datasets.Dataset.from_dict(records)
    ds.save_to_disk(str(tmp_path / "saved"), num_shards=3)
    datasets.DatasetDict({"train": ds, "test": ds.select(range(10))}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "pq").mkdir()
    for k in range(2):
        ds.shard(2, k).to_parquet(str(tmp_path / "pq" / f"train-{k:05d}-of-00002.parquet"))
    m = prepare_pretrain(
        PretrainDataRequest(
            {
                "saved": [f"hf:{tmp_path}/saved?where=source=pubmed"],
                "dict": [f"hf:{tmp_path}/dict?split=test"],
                "pq": [f"hf:{tmp_path}/pq"],
            },
            tok,
            tmp_path / "out",
        ),
        progress=False,
    )
    loaded = datasets.load_from_disk(str(tmp_path / "saved"))
    check(tmp_path / "out", "saved", tok, [r["text"] for r in loaded if r["source"] == "pubmed"], m)
    assert len(m["sources"]["saved"]["shards"]) == 3 and m["sources"]["saved"]["filtered"] == {"source=web": 45}
    check(tmp_path / "out", "dict", tok, datasets.load_from_disk(str(tmp_path / "dict"))["test"]["text"], m)
    check(tmp_path / "out", "pq", tok, records["text"], m)


# --------------------------------------------------------------------------- specs, hosts, processes


def test_spec_syntax():
    [spec] = parse_sources(
        {"c": ["csv:/x/NOTEEVENTS.csv.gz?text=TEXT&where=CATEGORY!=Discharge+summary,Echo&where=ISERROR!=1"]}
    )
    assert spec.kind == "csv" and spec.pattern == "/x/NOTEEVENTS.csv.gz" and spec.selection.text == ("TEXT",)
    assert spec.selection.filters == (
        Filter("CATEGORY", ("Discharge summary", "Echo"), False),
        Filter("ISERROR", ("1",), False),
    )
    [spec] = parse_sources({"b": ["pile:/p/*.jsonl.zst?subset=PubMed+Central,A%2CB"]})
    assert spec.selection.filters == (Filter("meta.pile_set_name", ("PubMed Central", "A,B"), True),)
    for bad, message in [
        ({"a": ["xml:/x"]}, "unknown kind 'xml'"),
        ({"a": ["csv:/x?subset=A"]}, "does not apply"),
        ({"a": ["csv:/x?colour=red"]}, "unknown option"),
        ({"a": ["csv:/x?where=A"]}, "FIELD=VALUE"),
    ]:
        with pytest.raises(SourceError, match=message):
            parse_sources(bad)
    with pytest.raises(SourceError, match="no --source named 'other'"):
        parse_sources({"a": ["csv:/x"]}, {"other": ("TEXT",)})
    with pytest.raises(SourceError, match="text fields given twice"):
        parse_sources({"a": ["csv:/x?text=TEXT"]}, {"a": ("TEXT",)})


def write_parts(tmp_path, rng, sizes):
    (tmp_path / "parts").mkdir()
    for k, n in enumerate(sizes):
        (tmp_path / "parts" / f"{k:02d}.jsonl").write_bytes(jsonl({"text": words(rng)} for _ in range(n)))
    return {"a": [f"jsonl:{tmp_path}/parts/0[0-3].jsonl"], "b": [f"jsonl:{tmp_path}/parts/0[4-6].jsonl"]}


def test_hosts_share_the_units_once_and_merge(tmp_path, tok):
    spec = write_parts(tmp_path, np.random.default_rng(6), [50, 10, 80, 5, 30, 30, 60])
    units = units_of(parse_sources(spec))
    for n in range(1, 6):
        shares = assign(units, n)
        assert sorted(i for s in shares for i in s) == list(range(len(units)))
        assert assign(units, n) == shares  # the same answer on every host
    assert len({tuple(s) for s in assign(units, 3)}) == 3
    whole = prepare_pretrain(PretrainDataRequest(spec, tok, tmp_path / "whole"), progress=False)
    split = [PretrainDataRequest(spec, tok, tmp_path / "split", num_shards=3, shard_index=i) for i in range(3)]
    assert prepare_pretrain(split[2], progress=False) is None
    assert prepare_pretrain(split[0], progress=False) is None
    from mellama_jax.data.prepare import Pending

    with pytest.raises(Pending, match="not prepared yet"):
        merge(tmp_path / "split")
    last = prepare_pretrain(split[1], progress=False)
    assert last["sources"] == whole["sources"] == merge(tmp_path / "split")["sources"]
    for source in ("a", "b"):
        assert written(tmp_path / "split", source) == written(tmp_path / "whole", source)


def test_processes_write_the_same_shards(tmp_path, tok):
    spec = {"a": write_parts(tmp_path, np.random.default_rng(7), [200, 150, 100, 50])["a"]}
    one = prepare_pretrain(PretrainDataRequest(spec, tok, tmp_path / "one", workers=1), progress=False)
    two = prepare_pretrain(PretrainDataRequest(spec, tok, tmp_path / "two", workers=2), progress=False)
    assert one["sources"] == two["sources"]
    for shard in (tmp_path / "one" / "a").glob("*.arrayrecord"):
        assert shard.read_bytes() == (tmp_path / "two" / "a" / shard.name).read_bytes()


# --------------------------------------------------------------------------- refusals (issue 15)


def test_no_documents_and_unknown_fields_fail_and_leave_nothing(tmp_path, tok):
    rows = [{"body": "insulin", "meta": {"pile_set_name": "Github"}}] * 3
    (tmp_path / "x.jsonl").write_bytes(jsonl(rows))
    cases = [
        (f"jsonl:{tmp_path}/x.jsonl", "field 'text' occurs in no row"),
        (
            f"pile:{tmp_path}/x.jsonl?text=body&subset=PubMed+Central",
            r"no documents \(dropped by filter "
            r"meta.pile_set_name=Github: 3\)",
        ),
        (f"jsonl:{tmp_path}/x.jsonl?text=body&where=meta.set=A", "field 'meta.set' occurs in no row"),
    ]
    for spec, message in cases:
        with pytest.raises(BadRecord, match=message):
            prepare_pretrain(PretrainDataRequest({"s": [spec]}, tok, tmp_path / "out"), progress=False)
        assert not (tmp_path / "out").exists()
    (tmp_path / "e.csv").write_text("A,B\n")
    with pytest.raises(BadRecord, match="source s: no documents"):
        prepare_pretrain(
            PretrainDataRequest({"s": [f"csv:{tmp_path}/e.csv?text=A"]}, tok, tmp_path / "out"), progress=False
        )
    with pytest.raises(BadRecord, match=f"{tmp_path}/e.csv: no column 'TEXT'; columns: A, B"):
        prepare_pretrain(
            PretrainDataRequest({"s": [f"csv:{tmp_path}/e.csv?text=TEXT"]}, tok, tmp_path / "out"), progress=False
        )


def test_other_sources_into_the_same_folder_need_overwrite(tmp_path, tok):
    spec = write_parts(tmp_path, np.random.default_rng(8), [20, 20, 20, 20, 20])
    prepare_pretrain(PretrainDataRequest(spec, tok, tmp_path / "out"), progress=False)
    other = {"c": spec["b"]}
    with pytest.raises(OutputError, match="holds data prepared from other sources"):
        prepare_pretrain(PretrainDataRequest(other, tok, tmp_path / "out"), progress=False)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["sources"].keys() == {"a", "b"}
    m = prepare_pretrain(PretrainDataRequest(other, tok, tmp_path / "out", overwrite=True), progress=False)
    assert set(m["sources"]) == {"c"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == ["c"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(OutputError, match="files this command did not write"):
        prepare_pretrain(PretrainDataRequest(other, tok, tmp_path / "mine", overwrite=True), progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "x"


def test_slurm_array_example_runs_one_share_per_task():
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "launch" / "prepare_array.sbatch"
    out = subprocess.run(
        ["bash", str(script)],
        env={"DRY_RUN": "1", "SHARDS": "3", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert len(out) == 3 and all(line.endswith(f"--num-shards 3 --shard-index {i} ") for i, line in enumerate(out))
    assert "subset=PubMed+Central" in out[0] and "NOTEEVENTS.csv.gz" in out[0]


def test_bench_tokenize_times_each_process_and_thread_count(tmp_path, tok):
    """The benchmark's own check (every timed run wrote exactly the plain loop's token count) passes for each
    distinct (format, processes, threads) run, and `auto` threads resolve to the cores shared among processes."""
    import os

    from mellama_jax.bench.tokenize import TokenizeBenchRequest, bench_tokenize

    corpus = tmp_path / "c.jsonl"
    rng = np.random.default_rng(5)
    corpus.write_text("".join(json.dumps({"text": words(rng)}) + "\n" for _ in range(50)))
    result = bench_tokenize(
        TokenizeBenchRequest(
            tok,
            corpus,
            repeat=1,
            formats=("jsonl.zst",),
            workers=(1, 2),
            workdir=str(tmp_path),
            rounds=1,
            threads=(None, 1),
        )
    )
    cores = os.cpu_count()
    want = list(dict.fromkeys([(1, cores), (1, 1), (2, max(1, cores // 2)), (2, 1)]))
    assert [(r["workers"], r["threads"]) for r in result["runs"]] == want
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    assert result["tokens"] == sum(len(doc) * n for doc, n in expected(tok, texts).items())


# ------------------------------------------------------------------ behaviours the blind mutant round found untested


def test_a_not_equal_filter_keeps_rows_without_the_field(tmp_path, tok):
    """docs/data.md: `where=FIELD!=V` keeps the rows whose FIELD is none of the values, and a row without FIELD
    is kept (while `where=FIELD=V` drops it)."""
    rng = np.random.default_rng(4)
    rows = [{"text": words(rng), "meta": {"kind": k}} for k in ("note", "echo", "note")]
    rows += [{"text": words(rng)} for _ in range(2)]  # no meta at all
    (tmp_path / "rows.jsonl").write_bytes(jsonl(rows))
    spec = f"jsonl:{tmp_path}/rows.jsonl?where=meta.kind!=echo"
    m = prepare_pretrain(PretrainDataRequest({"c": [spec]}, tok, tmp_path / "out"), progress=False)
    check(tmp_path / "out", "c", tok, [r["text"] for r in rows if r.get("meta", {}).get("kind") != "echo"], m)
    spec = f"jsonl:{tmp_path}/rows.jsonl?where=meta.kind=note"
    m = prepare_pretrain(PretrainDataRequest({"c": [spec]}, tok, tmp_path / "eq"), progress=False)
    check(tmp_path / "eq", "c", tok, [r["text"] for r in rows if r.get("meta", {}).get("kind") == "note"], m)


def test_plain_text_keeps_its_last_document_without_a_trailing_blank_line(tmp_path, tok):
    rng = np.random.default_rng(5)
    texts = [words(rng) for _ in range(3)]
    (tmp_path / "notes.txt").write_text("\n\n".join(texts))  # no newline after the last document
    m = prepare_pretrain(
        PretrainDataRequest({"c": [f"txt:{tmp_path}/notes.txt"]}, tok, tmp_path / "out"), progress=False
    )
    check(tmp_path / "out", "c", tok, texts, m)
