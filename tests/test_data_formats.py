"""Instruction data as it ships (Dolly JSONL, ShareGPT JSON, medalpaca JSON, Hugging Face Parquet and
save_to_disk folders), outputs that appear whole or not at all, and one-line errors for data of the wrong kind
(through the real command line)."""

import json
import subprocess
import sys

import pytest
from data_helpers import tiny_tokenizer, write_corpus

from mellama_jax.config import CONFIG_ROOT
from mellama_jax.data.corpus import BadRecord, Report
from mellama_jax.data.instruct import (
    Conversation,
    InstructDataRequest,
    prepare_instruct,
    read_conversations,
)
from mellama_jax.data.instruct_batches import InstructSource
from mellama_jax.data.prepare import PretrainDataRequest, prepare_pretrain
from mellama_jax.data.pretrain import PackedSource
from mellama_jax.outputs import OutputError, check_destination

DOLLY = [
    {"instruction": "Name a statin.", "context": "", "response": "Atorvastatin.", "category": "open_qa"},
    {
        "instruction": "Summarise.",
        "context": "Metformin lowers glucose.",
        "response": "It lowers sugar.",
        "category": "summarization",
    },
]
MEDALPACA = [
    {"instruction": "Answer the question.", "input": "What does insulin do?", "output": "Lowers glucose."},
    {"instruction": "Define fever.", "input": "", "output": "A raised temperature."},
]
SHAREGPT = [
    {
        "id": "a1",
        "conversations": [
            {"from": "human", "value": "I have a cough."},
            {"from": "gpt", "value": "How long?"},
            {"from": "human", "value": "Two days."},
            {"from": "gpt", "value": "Rest and fluids."},
        ],
    }
]


def want(fmt, record) -> Conversation:
    """The conversation a record stands for, written out by hand from each format's documented fields."""
    if fmt == "dolly":
        return Conversation(((record["instruction"], record["response"]),), input=record["context"])
    if fmt == "alpaca":
        return Conversation(((record["instruction"], record["output"]),), input=record["input"])
    turns = record["conversations"]
    return Conversation(tuple((turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns), 2)))


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("shipped")
    (root / "databricks-dolly-15k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in DOLLY))
    (root / "medical_meadow_wikidoc.json").write_text(json.dumps(MEDALPACA, indent=2))
    (root / "sharegpt.json").write_text(json.dumps(SHAREGPT))
    datasets.Dataset.from_list(MEDALPACA).to_parquet(str(root / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(SHAREGPT).save_to_disk(str(root / "saved"))
    return root, {
        "databricks-dolly-15k.jsonl": ("dolly", DOLLY),
        "medical_meadow_wikidoc.json": ("alpaca", MEDALPACA),
        "sharegpt.json": ("sharegpt", SHAREGPT),
        "train-00000-of-00001.parquet": ("alpaca", MEDALPACA),
        "saved": ("sharegpt", SHAREGPT),
    }


def test_each_shipped_format_reads_as_its_conversations(shipped, tmp_path):
    root, files = shipped
    for name, (fmt, records) in files.items():
        report = Report()
        got = [conv for _, conv in read_conversations(root / name, report)]
        assert got == [want(fmt, r) for r in records], name
        assert not report.skipped, (name, report.locations)
    tok = tiny_tokenizer(tmp_path / "tok")
    m = prepare_instruct(InstructDataRequest([root / name for name in files], tok, tmp_path / "ins", 128))
    assert m["rows"] == sum(len(records) for _, records in files.values()) and m["report"]["skipped_total"] == 0


def test_failed_prepare_instruct_leaves_nothing_and_overwrite_is_asked(shipped, tmp_path):
    root, _ = shipped
    tok = tiny_tokenizer(tmp_path / "tok")
    (tmp_path / "bad.jsonl").write_text('{"instruction": "x"}\n')
    with pytest.raises(BadRecord, match="no usable examples"):
        prepare_instruct(InstructDataRequest([tmp_path / "bad.jsonl"], tok, tmp_path / "new" / "ins", 64))
    assert not (tmp_path / "new").exists()
    prepare_instruct(InstructDataRequest([root / "sharegpt.json"], tok, tmp_path / "ins", 64))
    with pytest.raises(OutputError, match="not empty"):
        prepare_instruct(InstructDataRequest([root / "sharegpt.json"], tok, tmp_path / "ins", 64))
    again = prepare_instruct(
        InstructDataRequest([root / "medical_meadow_wikidoc.json"], tok, tmp_path / "ins", 64, overwrite=True)
    )
    assert again["rows"] == 2


def test_data_of_the_wrong_kind_is_named(tmp_path):
    import numpy as np

    tok = tiny_tokenizer(tmp_path / "tok")
    pre = tmp_path / "pre"
    corpus = write_corpus(tmp_path, "clinical", 20, np.random.default_rng(0))
    prepare_pretrain(PretrainDataRequest({"clinical": [corpus]}, tok, pre), progress=False)
    (tmp_path / "i.jsonl").write_text(json.dumps(DOLLY[0]) + "\n")
    ins = tmp_path / "ins"
    prepare_instruct(InstructDataRequest([tmp_path / "i.jsonl"], tok, ins, 64))
    with pytest.raises(BadRecord, match=f"{ins}: data.path holds an instruction dataset"):
        PackedSource(ins, "clinical", 32, 0)
    with pytest.raises(BadRecord, match=f"{pre}: data.path holds pretraining data"):
        InstructSource(pre)
    env_run = [sys.executable, "-m", "mellama_jax.cli"]
    cases = [
        (
            [
                *env_run,
                "train",
                "--config",
                str(CONFIG_ROOT / "tiny-pretrain.yaml"),
                f"data.path={ins}",
                f"run.dir={tmp_path}/run",
            ],
            f"{ins}: data.path holds an instruction dataset",
        ),
        (
            [
                *env_run,
                "prepare",
                "pretrain",
                "--source",
                f"c={tmp_path}/clinical.jsonl",
                "--fields",
                "x=text",
                "--tokenizer",
                str(tok),
                "--out",
                str(tmp_path / "o1"),
            ],
            "no --source named 'x'",
        ),
        (
            [
                *env_run,
                "prepare",
                "pretrain",
                "--source",
                f"c=jsonl:{tmp_path}/clinical.jsonl?text=body",
                "--tokenizer",
                str(tok),
                "--out",
                str(tmp_path / "o2"),
            ],
            "field 'body' occurs in no row",
        ),
        (
            [
                *env_run,
                "prepare",
                "pretrain",
                "--source",
                f"c=jsonl:{tmp_path}/clinical.jsonl",
                "--tokenizer",
                str(tok),
                "--out",
                str(pre),
            ],
            "holds data prepared from other sources",
        ),
        ([*env_run, "prepare", "merge", "--out", str(ins)], "no plan.json of `prepare pretrain` here"),
        (
            [
                *env_run,
                "prepare",
                "pretrain",
                "--source",
                f"c=xml:{tmp_path}/clinical.jsonl",
                "--tokenizer",
                str(tok),
                "--out",
                str(tmp_path / "o3"),
            ],
            "unknown kind 'xml'",
        ),
    ]
    for command, message in cases:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip() and "tokenising" not in line]
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists() and not (tmp_path / "run").exists()


def test_token_bytes_add_up_to_the_texts_utf8_length(llama2_tokenizer_path):
    """Bits per byte divides by the held-out text's bytes, summed from per-token byte lengths: for LLaMA's
    tokenizer a text's tokens add up to its UTF-8 length plus the one-space prefix SentencePiece adds."""
    from mellama_jax.data.tokenizer import Tokenizer

    tok = Tokenizer.load(llama2_tokenizer_path)
    sizes = tok.token_bytes()
    for text in (
        "Metformin lowers hepatic glucose production.",
        "Temp 38.5\u00b0C,\nSpO\u2082 94%",
        "\u6cbb\u7597 \u2014 na\u00efve   spaces",
        "\U0001f9ea lab",
    ):
        assert sizes[tok.encode(text)].sum() == len((" " + text).encode()), text
    assert sizes[[tok.bos_id, tok.eos_id]].sum() == 0


def test_the_destination_rule_by_hand(tmp_path):
    """--overwrite replaces only an earlier output of the same command; a destination that holds, or lies
    inside, an input is refused whatever the flags (docs: README, artifacts)."""
    from mellama_jax.outputs import atomic_output, check_destination

    with atomic_output(tmp_path / "eval-out", "eval") as out:
        (out / "summary.json").write_text("{}")
    with pytest.raises(OutputError, match="holds a 'eval' output; --overwrite replaces only an earlier 'hf-model'"):
        check_destination(tmp_path / "eval-out", "hf-model", overwrite=True)
    assert check_destination(tmp_path / "eval-out", "eval", overwrite=True) == (tmp_path / "eval-out").resolve()
    (tmp_path / "run" / "params").mkdir(parents=True)
    for dest in (tmp_path / "run", tmp_path / "run" / "params" / "hf"):
        with pytest.raises(OutputError, match="overlap the input"):
            check_destination(dest, "hf-model", overwrite=True, inputs=[tmp_path / "run" / "params"])


def test_an_existing_empty_folder_is_a_new_destination(tmp_path):
    """A folder made ahead (empty, as `mkdir -p` or a scheduler leaves it) takes any command's output without
    --overwrite; one holding a file does not."""
    (tmp_path / "made").mkdir()
    assert check_destination(tmp_path / "made", "eval") == (tmp_path / "made").resolve()
    (tmp_path / "made" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        check_destination(tmp_path / "made", "eval")
