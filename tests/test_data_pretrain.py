"""`prepare pretrain` and the packed, mixed, process-sharded, resumable pretraining pipeline."""

import json
import subprocess
import sys
import textwrap
from collections import Counter

import numpy as np
import pytest
from data_helpers import tiny_tokenizer, write_corpus

from mellama_jax.data.corpus import BadRecord
from mellama_jax.data.prepare import PretrainDataRequest, prepare_pretrain
from mellama_jax.data.pretrain import PackedSource, iterate, pretrain_batches
from mellama_jax.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    tok = tiny_tokenizer(root / "tok")
    inputs = {
        name: [write_corpus(root, name, n, rng)]
        for name, n in (("biomedical", 400), ("clinical", 60), ("general", 150))
    }
    out = root / "prepared"
    manifest = prepare_pretrain(PretrainDataRequest(inputs, tok, out), progress=False)
    return dict(root=root, tok=tok, inputs=inputs, out=out, manifest=manifest)


def test_prepare_counts_and_is_deterministic(corpus, tmp_path):
    m = corpus["manifest"]
    assert m["sources"]["biomedical"]["documents"] == 400
    again = prepare_pretrain(PretrainDataRequest(corpus["inputs"], corpus["tok"], tmp_path / "again"), progress=False)
    assert again["sources"] == m["sources"]
    for shard in (corpus["out"] / "clinical").glob("*.arrayrecord"):
        assert shard.read_bytes() == (tmp_path / "again" / "clinical" / shard.name).read_bytes()


def test_rerun_skips_finished_shards(corpus):
    shard = next((corpus["out"] / "biomedical").glob("*.arrayrecord"))
    before = shard.stat().st_mtime_ns
    prepare_pretrain(PretrainDataRequest(corpus["inputs"], corpus["tok"], corpus["out"]), progress=False)
    assert shard.stat().st_mtime_ns == before


def test_bad_records_are_counted_with_locations(tmp_path, corpus):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(
        b'{"text": "insulin glucose"}\n{"text": \n{"body": "x"}\n{"text": "   "}\n'
        b'{"text": "caf\xe9"}\n[1, 2]\n{"text": "tumour gene"}\n'
    )
    m = prepare_pretrain(PretrainDataRequest({"b": [bad]}, corpus["tok"], tmp_path / "out"), progress=False)
    assert m["sources"]["b"]["documents"] == 2 and m["sources"]["b"]["skipped"] == 5
    report = json.loads(next((tmp_path / "out" / "b").glob("*.done.json")).read_text())["report"]
    assert report["skipped"] == {"invalid JSON": 2, "missing field": 1, "empty text": 1, "invalid UTF-8": 1}
    assert f"{bad}:2: invalid JSON" in "\n".join(report["skipped_examples"])
    assert any(line.startswith(f"{bad}:5: invalid UTF-8") for line in report["skipped_examples"])
    with pytest.raises(BadRecord, match=f"{bad}:2: invalid JSON"):
        prepare_pretrain(
            PretrainDataRequest({"b": [bad]}, corpus["tok"], tmp_path / "strict", strict=True), progress=False
        )
    assert not list((tmp_path / "strict" / "b").glob("*.arrayrecord*"))  # nothing half-written


def test_text_and_parquet_inputs(tmp_path, corpus):
    import pyarrow as pa
    import pyarrow.parquet as pq

    txt = tmp_path / "notes.txt"
    txt.write_text("patient admitted\nwith fever\n\n\ndischarge plan\n")
    pq.write_table(
        pa.table({"title": ["gene", "tumour"], "abstract": ["kinase receptor", ""]}), tmp_path / "papers.parquet"
    )
    m = prepare_pretrain(
        PretrainDataRequest(
            {"t": [txt], "p": [tmp_path / "papers.parquet"]},
            corpus["tok"],
            tmp_path / "out",
            fields={"p": ("title", "abstract")},
        ),
        progress=False,
    )
    assert m["sources"]["t"]["documents"] == 2 and m["sources"]["p"]["documents"] == 2
    tok = Tokenizer.load(corpus["tok"])
    assert m["sources"]["t"]["tokens"] == sum(
        len(tok.encode(t)) + 2 for t in ["patient admitted\nwith fever", "discharge plan"]
    )


def test_packing_loses_and_duplicates_nothing(corpus):
    tok = Tokenizer.load(corpus["tok"])
    source = PackedSource(corpus["out"], "clinical", seq_len=48, seed=3)
    stream = []
    for r in range(source.rows_per_epoch):
        row = source[r]
        seg, pos = row["segment_ids"], row["positions"]
        for s in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == s)
            assert (np.diff(where) == 1).all() and (pos[where] == np.arange(len(where))).all()
        stream.extend(row["tokens"][seg > 0].tolist())
    # Documents are BOS ... EOS runs of the stream; compare them as a multiset with the inputs.
    docs, current = [], []
    for t in stream:
        current.append(t)
        if t == tok.eos_id:
            docs.append(tuple(current))
            current = []
    assert not current
    texts = [json.loads(line)["text"] for line in corpus["inputs"]["clinical"][0].read_text().splitlines()]
    expected = Counter(tuple(tok.encode(t, bos=True, eos=True)) for t in texts)
    assert Counter(docs) == expected
    assert source.rows_per_epoch == -(-sum(map(len, expected.elements())) // 48)


def _documents(source, first_row: int, rows: int, eos: int) -> list[tuple]:
    """The documents (BOS ... EOS token runs) of `rows` consecutive rows, in the order they appear."""
    stream = []
    for r in range(first_row, first_row + rows):
        row = source[r]
        stream.extend(row["tokens"][row["segment_ids"] > 0].tolist())
    docs, current = [], []
    for t in stream:
        current.append(t)
        if t == eos:
            docs.append(tuple(current))
            current = []
    assert not current
    return docs


def test_held_out_documents_never_reach_training_and_epochs_reshuffle(corpus):
    """Against the input file: training and held-out documents together are the inputs exactly once each, the
    held-out ones `holdout_documents` many; every training epoch holds all training documents, in a new order."""
    tok = Tokenizer.load(corpus["tok"])
    texts = [json.loads(line)["text"] for line in corpus["inputs"]["clinical"][0].read_text().splitlines()]
    expected = Counter(tuple(tok.encode(t, bos=True, eos=True)) for t in texts)
    train = PackedSource(corpus["out"], "clinical", seq_len=48, seed=3, split="train", holdout_documents=9)
    held = PackedSource(corpus["out"], "clinical", seq_len=48, seed=3, split="eval", holdout_documents=9)
    epochs = [_documents(train, e * train.rows_per_epoch, train.rows_per_epoch, tok.eos_id) for e in range(2)]
    held_docs = _documents(held, 0, held.rows_per_epoch, tok.eos_id)
    assert len(held_docs) == 9 and Counter(epochs[0]) + Counter(held_docs) == expected
    assert Counter(epochs[1]) == Counter(epochs[0]) and epochs[1] != epochs[0]
    assert _documents(held, held.rows_per_epoch, held.rows_per_epoch, tok.eos_id) == held_docs  # eval: fixed


def test_long_documents_are_split_not_dropped(corpus):
    source = PackedSource(corpus["out"], "biomedical", seq_len=8, seed=0)
    total = sum(int((source[r]["segment_ids"] > 0).sum()) for r in range(source.rows_per_epoch))
    assert total == corpus["manifest"]["sources"]["biomedical"]["tokens"]


def test_examples_predict_the_next_token_of_the_same_document_only(corpus):
    """Next-token examples from packed rows, checked piece by piece: inside each document piece every token but
    the last predicts its successor with weight 1; a piece's last token (whose successor belongs to the next
    document, or to the next row) and padding weigh 0; positions restart at 0 in each piece."""
    from mellama_jax.data.pretrain import to_example

    source = PackedSource(corpus["out"], "general", seq_len=40, seed=2)
    pieces_seen = 0
    for r in range(source.rows_per_epoch):
        row = source[r]
        ex = to_example(row)
        expected = np.zeros(40, np.float32)
        for s in np.unique(row["segment_ids"][row["segment_ids"] > 0]):
            a, b = np.flatnonzero(row["segment_ids"] == s)[[0, -1]]  # the piece is tokens a..b
            expected[a:b] = 1.0
            np.testing.assert_array_equal(ex["targets"][a:b], row["tokens"][a + 1 : b + 1])
            np.testing.assert_array_equal(ex["positions"][a : b + 1], np.arange(b + 1 - a))
            pieces_seen += 1
        np.testing.assert_array_equal(ex["loss_weights"], expected)
    assert pieces_seen > source.rows_per_epoch  # rows hold several documents


def test_mixture_token_shares_follow_the_weights(corpus):
    weights = {"biomedical": 15, "clinical": 1, "general": 4}
    batches = pretrain_batches(corpus["out"], weights, seq_len=32, global_batch=100, seed=0)
    tokens = Counter()
    for k in range(200):  # 20,000 rows
        b = batches[k]
        for sid, n in zip(b["source_ids"][:, 0], (b["segment_ids"] > 0).sum(-1)):
            tokens[int(sid)] += int(n)
    total = sum(tokens.values())
    for i, w in enumerate(weights.values()):
        assert abs(tokens[i] / total - w / 20) < 0.01, (i, tokens[i] / total)


def test_process_shards_make_the_global_batch(corpus):
    weights = {"biomedical": 15, "clinical": 1, "general": 4}
    whole = pretrain_batches(corpus["out"], weights, 32, global_batch=8, seed=5)
    parts = [
        pretrain_batches(corpus["out"], weights, 32, global_batch=8, seed=5, process_index=p, process_count=2)
        for p in range(2)
    ]
    for k in range(5):
        joined = np.concatenate([parts[0][k]["inputs"], parts[1][k]["inputs"]])
        np.testing.assert_array_equal(joined, whole[k]["inputs"])


RESUME = textwrap.dedent("""
    import json, sys, hashlib
    from mellama_jax.data.pretrain import pretrain_batches, iterate
    out, p, n, state = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    it = iterate(pretrain_batches(out, {"biomedical": 15, "clinical": 1, "general": 4}, 32, 8, seed=1,
                                  process_index=p, process_count=n))
    if state != "-":
        it.set_state(json.loads(state))
    print(json.dumps([hashlib.sha256(next(it)["inputs"].tobytes()).hexdigest() for _ in range(4)]))
""")


@pytest.mark.parametrize("processes", [1, 2])
def test_resume_from_iterator_state_in_a_new_process(corpus, processes):
    weights = {"biomedical": 15, "clinical": 1, "general": 4}
    for p in range(processes):
        it = iterate(pretrain_batches(corpus["out"], weights, 32, 8, seed=1, process_index=p, process_count=processes))
        import hashlib

        hashes = [hashlib.sha256(next(it)["inputs"].tobytes()).hexdigest() for _ in range(7)]
        it = iterate(pretrain_batches(corpus["out"], weights, 32, 8, seed=1, process_index=p, process_count=processes))
        for _ in range(3):
            next(it)
        state = json.dumps(it.get_state())
        result = subprocess.run(
            [sys.executable, "-c", RESUME, str(corpus["out"]), str(p), str(processes), state],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout.strip().splitlines()[-1]) == hashes[3:7]


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        pretrain_batches(tmp_path, {"a": 1}, 32, 8)


def test_rerun_prepares_again_a_shard_whose_input_changed(tmp_path):
    """A re-run into the same folder reuses a finished shard only while its input is the one it was made from:
    after the file gains two documents, the shard is written again and the manifest counts them."""
    rng = np.random.default_rng(1)
    tok = tiny_tokenizer(tmp_path / "tok")
    path = write_corpus(tmp_path, "clinical", 20, rng)
    request = PretrainDataRequest({"clinical": [path]}, tok, tmp_path / "out")
    assert prepare_pretrain(request, progress=False)["sources"]["clinical"]["documents"] == 20
    with open(path, "a") as f:
        f.write("".join(json.dumps({"text": f"one more clinical note number {i}"}) + "\n" for i in range(2)))
    assert prepare_pretrain(request, progress=False)["sources"]["clinical"]["documents"] == 22
