"""On the real files in ../shared/data: a tiny LLaMA's held-out loss goes down (slow: run with -m slow).

PubMed abstracts (NCBI disease corpus) for continual pretraining, ChatDoctor conversations for LoRA, both
tokenised with the real LLaMA2 tokenizer.
"""

import json

import pytest
from conftest import SHARED_DATA, shared_data

from mellama_jax.config import CONFIG_ROOT, load_config
from mellama_jax.data.instruct import InstructDataRequest, prepare_instruct
from mellama_jax.data.prepare import PretrainDataRequest, prepare_pretrain
from mellama_jax.train.loop import train

pytestmark = pytest.mark.slow


def eval_curve(run_dir):
    return [
        (r["step"], r["loss"])
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "eval"
    ]


def test_real_data_held_out_loss_goes_down(tmp_path):
    tok = shared_data("llama2-tokenizer")
    prepare_pretrain(
        PretrainDataRequest(
            {"biomedical": [SHARED_DATA / "pubmed-abstracts" / "abstracts.jsonl"]},
            tok,
            tmp_path / "pre",
            {"biomedical": ("title", "abstract")},
        ),
        progress=False,
    )
    common = [
        "model.vocab_size=32000",
        "model.hidden_size=128",
        "model.intermediate_size=352",
        "model.max_seq_len=256",
        "train.seq_len=128",
        "run.progress=false",
        "checkpoint.every=1000",
        "run.log_every=10",
        "run.eval_every=20",
        "run.eval_batches=16",
    ]
    pre = train(
        load_config(
            CONFIG_ROOT / "tiny-pretrain.yaml",
            common
            + [
                f"data.path={tmp_path}/pre",
                f"run.dir={tmp_path}/run-pre",
                "data.mixture={biomedical: 1}",
                "data.holdout_documents=40",
                "train.steps=160",
                "train.batch_size=16",
                "optimizer.learning_rate=3e-3",
            ],
        )
    )
    curve = eval_curve(tmp_path / "run-pre")
    print("pretrain held-out loss:", curve)
    assert curve[-1][1] < curve[0][1] - 0.5

    chat = SHARED_DATA / "chatdoctor" / "chatdoctor5k.json"
    records = json.loads(chat.read_text())
    (tmp_path / "train.json").write_text(json.dumps(records[:5000]))
    (tmp_path / "eval.json").write_text(json.dumps(records[5000:5200]))
    prepare_instruct(InstructDataRequest([tmp_path / "train.json"], tok, tmp_path / "ins", 256))
    prepare_instruct(InstructDataRequest([tmp_path / "eval.json"], tok, tmp_path / "ins-eval", 256))
    train(
        load_config(
            CONFIG_ROOT / "tiny-lora.yaml",
            common
            + [
                f"data.path={tmp_path}/ins",
                f"data.eval_path={tmp_path}/ins-eval",
                f"run.dir={tmp_path}/run-lora",
                f"train.init_from={pre['export']}",
                "train.seq_len=256",
                "train.steps=100",
                "train.batch_size=16",
                "optimizer.learning_rate=5e-3",
            ],
        )
    )
    curve = eval_curve(tmp_path / "run-lora")
    print("lora held-out loss:", curve)
    assert curve[-1][1] < curve[0][1]
