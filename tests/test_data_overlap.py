"""`prepare overlap`: benchmark examples against a planted pretraining corpus, and the filtered copy trains."""

import json

import pytest

from mellama_jax.cli import main
from mellama_jax.config import load_config
from mellama_jax.data.prepare import PretrainDataRequest, prepare_pretrain
from mellama_jax.eval.overlap import OverlapRequest, find_overlap, window_hashes, words

A = (
    "metformin lowers hepatic glucose output and improves insulin sensitivity in adults with type two diabetes "
    "who were followed for a year"
)
B = (
    "statin therapy reduced the rate of major cardiovascular events among older patients with chronic kidney "
    "disease in the trial cohort"
)
C = "aspirin was given"  # with its hypothesis: 9 words, shorter than a window
D = (
    "beta blockers after myocardial infarction were associated with lower mortality in a registry of "
    "hospitals across three countries"
)
E = (
    "warfarin dosing guided by genotype did not improve time in the therapeutic range compared with a "
    "clinical algorithm in this study"
)
HYP = {
    "a": "Metformin helps.",
    "b": "Statins help.",
    "c": "Aspirin helps.",
    "d": "Beta blockers help.",
    "e": "Genotype helps.",
}


@pytest.fixture
def planted(demo_data, tmp_path):
    """A corpus where A sits verbatim inside a longer document, B is copied with its case, spacing and
    punctuation changed, C (too short for a window) is copied verbatim, E's first 12 words only (one short of a
    window) occur, and D occurs nowhere; and the BioNLI file of the five examples."""
    bio = [
        f"Background text about care. {A} More text follows here.",
        "An unrelated abstract about vitamin D and bone density in children.",
        "STATIN  therapy, reduced the RATE of major\ncardiovascular events - among older patients with "
        "chronic kidney disease; in the TRIAL cohort!",
    ]
    clinical = [
        f"Note: {C} for pain. Hypothesis: Aspirin helps.",
        " ".join(E.split()[:12]) + " and then something else entirely",
    ]
    for name, docs in (("biomedical", bio), ("clinical", clinical)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare_pretrain(
        PretrainDataRequest(
            {s: [tmp_path / f"{s}.jsonl"] for s in ("biomedical", "clinical")}, demo_data / "tok", tmp_path / "pre"
        ),
        progress=False,
    )
    test = tmp_path / "bionli.jsonl"
    test.write_text(
        "".join(
            json.dumps({"id": k, "premise": p, "hypothesis": HYP[k], "label_cat": "pos"}) + "\n"
            for k, p in (("a", A), ("b", B), ("c", C), ("d", D), ("e", E))
        )
    )
    return tmp_path / "pre", test


def test_words_and_windows_by_hand():
    assert words("STATIN  therapy, reduced\nthe RATE-of x_y") == [
        "statin",
        "therapy",
        "reduced",
        "the",
        "rate",
        "of",
        "x",
        "y",
    ]
    h = window_hashes(["a", "b", "c", "a", "b"], 2)
    assert len(h) == 4 and h[0] == h[3] and len(set(h.tolist())) == 3
    assert len(window_hashes(["a"] * 12, 13)) == 0


def test_overlap_finds_exactly_the_planted_copies(planted, tmp_path, monkeypatch):
    from mellama_jax.eval import overlap

    monkeypatch.setattr(overlap, "CHUNK", 2)  # the 3-document shard is read in two pieces, by two processes
    data, test = planted
    report = find_overlap(
        OverlapRequest(data, (f"bionli={test}",), tmp_path / "report", workers=2, filtered_out=tmp_path / "clean")
    )
    t = report["tasks"]["bionli"]
    assert (t["examples"], t["overlapping"], t["too_short"]) == (5, 2, 1)
    assert t["overlapping_ids"] == ["a", "b"] and t["share"] == pytest.approx(0.4)
    shard = json.loads((data / "manifest.json").read_text())["sources"]["biomedical"]["shards"][0]
    assert t["matches"] == [
        {"id": "a", "source": "biomedical", "document": f"biomedical/{shard}#0"},
        {"id": "b", "source": "biomedical", "document": f"biomedical/{shard}#2"},
    ]
    assert report["documents_scanned"] == 5 and report["documents_matched"] == 2
    assert json.loads((tmp_path / "report" / "overlap.json").read_text())["tasks"] == report["tasks"]

    clean = json.loads((tmp_path / "clean" / "manifest.json").read_text())["sources"]
    assert (clean["biomedical"]["documents"], clean["biomedical"]["overlap_removed"]) == (1, 2)
    assert (clean["clinical"]["documents"], clean["clinical"]["overlap_removed"]) == (2, 0)
    again = find_overlap(OverlapRequest(tmp_path / "clean", (f"bionli={test}",), tmp_path / "again", workers=1))
    assert again["tasks"]["bionli"]["overlapping"] == 0 and again["documents_scanned"] == 3


def test_the_filtered_copy_trains(planted, tmp_path):
    from mellama_jax.train.loop import train

    data, test = planted
    find_overlap(
        OverlapRequest(data, (f"bionli={test}",), tmp_path / "report", workers=1, filtered_out=tmp_path / "clean")
    )
    cfg = load_config(
        None,
        [
            "model=tiny",
            f"data.path={tmp_path / 'clean'}",
            "data.mixture={biomedical: 3, clinical: 1, general: 0}",
            "train.seq_len=32",
            "train.batch_size=8",
            "train.steps=2",
            f"run.dir={tmp_path / 'run'}",
            "run.progress=false",
            "run.plot=false",
            "mesh.ici={data: 1, fsdp: -1, tensor: 1}",
        ],
    )
    summary = train(cfg)
    assert summary["steps"] == 2


def test_bad_arguments_get_one_line(planted, tmp_path, capsys):
    data, test = planted
    assert main(["prepare", "overlap", "--data", str(data), "--task", str(test), "--out", str(tmp_path / "o")]) == 2
    assert "expected TASK=FILE" in capsys.readouterr().err
    assert (
        main(["prepare", "overlap", "--data", str(tmp_path), "--task", f"bionli={test}", "--out", str(tmp_path / "o")])
        == 2
    )
    assert "not a prepared dataset" in capsys.readouterr().err
    assert main(["prepare", "overlap", "--data", str(data), "--task", f"bionli={test}", "--out", str(data)]) == 2
    assert "overlap the input" in capsys.readouterr().err
    assert (
        main(
            [
                "prepare",
                "overlap",
                "--data",
                str(data),
                "--task",
                f"bionli={test}",
                "--task",
                f"bionli={test}",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "given twice" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"tasks": {"bionli": {}}}')
    assert (
        main(
            [
                "eval",
                "--task",
                "bionli",
                "--data",
                str(test),
                "--model",
                str(tmp_path),
                "--out",
                str(tmp_path / "e"),
                "--overlap",
                str(tmp_path / "bad.json"),
            ]
        )
        == 2
    )
    assert "has no list of overlapping_ids" in capsys.readouterr().err


def test_eval_scores_the_clean_subset_beside_the_full_set(planted, demo_data, tmp_path):
    """With the overlap report, summary.json holds the metrics of the examples it found clean (c, d, e here),
    recomputed by hand from the written predictions; summary.md shows both rows."""
    import shutil

    import torch
    from conftest import hf_tiny_config
    from transformers import LlamaForCausalLM

    from mellama_jax.convert.api import ImportRequest, hf_to_jax
    from mellama_jax.eval.run import EvalRequest, evaluate

    data, test = planted
    find_overlap(OverlapRequest(data, (f"bionli={test}",), tmp_path / "report", workers=1))
    torch.manual_seed(0)
    LlamaForCausalLM(hf_tiny_config(2, vocab_size=512)).save_pretrained(tmp_path / "hf")
    shutil.copyfile(demo_data / "tok" / "tokenizer.model", tmp_path / "hf" / "tokenizer.model")
    params = hf_to_jax(ImportRequest(tmp_path / "hf", tmp_path / "jax"), progress=False)
    summary = evaluate(
        EvalRequest(
            "bionli", test, params, tmp_path / "eval", max_new_tokens=4, dtype="float32", overlap=tmp_path / "report"
        )
    )  # the folder `prepare overlap` wrote
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    clean = [row for row in rows if row["id"] in ("c", "d", "e")]
    assert summary["clean"]["examples"] == 3 and summary["clean"]["overlapping"] == 2
    assert summary["clean"]["accuracy"] == pytest.approx(sum(r["prediction"] == r["gold"] for r in clean) / 3)
    assert "| bionli (clean) |" in (tmp_path / "eval" / "summary.md").read_text()
    with pytest.raises(Exception, match="no task 'mednli' in this overlap report"):
        evaluate(
            EvalRequest(
                "mednli",
                test,
                params,
                tmp_path / "eval2",
                max_new_tokens=4,
                overlap=tmp_path / "report" / "overlap.json",
            )
        )


def test_instruction_data_is_scanned_too(planted, demo_data, tmp_path):
    """A prepared instruction set: the example whose response quotes A is found (row 1); a filtered copy is
    refused in one line (instruction data are re-prepared from their inputs instead)."""
    from mellama_jax.data.instruct import InstructDataRequest, prepare_instruct

    _, test = planted
    records = [
        {"instruction": "Say hello.", "input": "", "output": "Hello."},
        {"instruction": "Summarise the finding.", "input": "", "output": A.upper() + "."},
    ]
    (tmp_path / "ins.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    prepare_instruct(InstructDataRequest([tmp_path / "ins.jsonl"], demo_data / "tok", tmp_path / "ins", 256))
    report = find_overlap(OverlapRequest(tmp_path / "ins", (f"bionli={test}",), tmp_path / "report", workers=1))
    assert report["tasks"]["bionli"]["matches"] == [
        {"id": "a", "source": "instruct", "document": "instruct/examples#1"}
    ]
    with pytest.raises(Exception, match="--filtered-out copies pretraining data"):
        find_overlap(
            OverlapRequest(
                tmp_path / "ins", (f"bionli={test}",), tmp_path / "r2", workers=1, filtered_out=tmp_path / "clean"
            )
        )


def test_a_clean_row_without_clean_examples_shows_no_full_set_figures(tmp_path):
    """Every example overlapped: the clean row of summary.md must not repeat the full set's accuracy."""
    from mellama_jax.eval.report import write

    summary = {
        "task": "bionli",
        "backend": "jax",
        "accuracy": 0.75,
        "examples": 4,
        "clean": {"examples": 0, "overlapping": 4},
    }
    write(tmp_path / "out", [], [], summary)
    clean_row = next(
        line
        for line in (tmp_path / "out" / "summary.md").read_text().splitlines()
        if line.startswith("| bionli (clean) |")
    )
    assert "0.7500" not in clean_row and "skipped" in clean_row
