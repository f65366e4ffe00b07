"""KV-cache decoding against transformers and full recompute; the evaluation tasks and their scoring."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, hf_tiny_config, shared_data
from transformers import LlamaForCausalLM

from mellama_jax.cli import main
from mellama_jax.convert.api import ExportRequest, ImportRequest, hf_to_jax, jax_to_hf
from mellama_jax.eval.run import EvalRequest, GenerateRequest, HFBackend, complete, evaluate
from mellama_jax.eval.scoring import classification_metrics, first_choice
from mellama_jax.eval.tasks import exam_question, load_task, load_templates, render
from mellama_jax.generate import generate, greedy_generate, truncate_at_stop


def test_kv_cache_matches_full_recompute_and_transformers(hf_pair, rng):
    hf, ours, cfg = hf_pair
    prompts = [list(rng.integers(3, cfg.vocab_size, n)) for n in (6, 2, 10)]
    cached = generate(ours, prompts, 20)
    np.testing.assert_array_equal(cached, greedy_generate(ours, prompts, 20))
    width = max(map(len, prompts))
    ids = torch.zeros((3, width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    with torch.no_grad():
        ref = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=20,
            min_new_tokens=20,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    np.testing.assert_array_equal(cached, ref[:, width:].numpy())


def test_decoding_holds_the_layer_weights_once(rng):
    """`decoder` slices each layer's weights out of the stacked parameters once; the compiled decode reads them
    where they lie, so its temporaries hold no copy of them (slicing inside it, as before, added one per call:
    135 MB of temporaries against 4 MB now for bench-60m's 101 MB of layers). Same tokens either way."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mellama_jax.config import load_model_preset
    from mellama_jax.generate import _decode, decoder, left_pad
    from mellama_jax.model import Llama

    cfg = dataclasses.replace(
        load_model_preset("tiny"), hidden_size=256, head_dim=64, intermediate_size=688, vocab_size=512
    )
    model = Llama(cfg, rngs=nnx.Rngs(0))
    parts = decoder(model)
    layer_bytes = sum(x.nbytes for x in jax.tree.leaves(parts.layers))
    assert layer_bytes == cfg.num_layers * (4 * 256 * 256 + 3 * 256 * 688 + 2 * 256) * 4
    ids, mask = (jnp.asarray(a) for a in left_pad([[5, 6, 7, 8]], 0, buckets=True))
    compiled = _decode.lower(*parts, ids, mask, 4, jnp.int32(-1), jax.random.key(0), 0.0, 1.0, None).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < layer_bytes / 4
    prompts = [list(rng.integers(3, 512, n)) for n in (4, 7)]
    np.testing.assert_array_equal(generate(parts, prompts, 6), greedy_generate(model, prompts, 6))


def test_a_consuming_decoder_frees_the_stacked_layers(monkeypatch):
    """`decoder(model, consume=True)`, as `eval` loads a model: each stacked layer weight is freed as soon as it is
    sliced, so the live bytes never exceed the model plus its largest stacked weight (without `consume` they grow
    by all the layers); the slices are the reference model's layers, and nothing the decoder keeps is freed."""
    import dataclasses
    import gc

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mellama_jax.config import load_model_preset
    from mellama_jax.generate import decoder
    from mellama_jax.model import Llama
    from mellama_jax.model.llama import _layer_slice

    cfg = dataclasses.replace(load_model_preset("tiny"), vocab_size=512)
    reference = nnx.state(Llama(cfg, rngs=nnx.Rngs(0)).layers)
    array_type = type(jnp.zeros(1))
    seen = []  # live bytes after each slice `unstacked_layers` takes
    slice_array = array_type.__getitem__
    monkeypatch.setattr(
        array_type,
        "__getitem__",
        lambda self, index: (slice_array(self, index), seen.append(sum(x.nbytes for x in jax.live_arrays())))[0],
    )

    def peak_growth(consume: bool) -> tuple[float, float]:  # (peak, final) live bytes added, in layer weights
        model = Llama(cfg, rngs=nnx.Rngs(0))
        stacked = jax.tree.leaves(nnx.state(model.layers))
        layer_bytes = sum(x.nbytes for x in stacked)
        gc.collect()  # arrays other tests left in reference cycles must not be freed inside the measurement
        seen.clear()
        before = sum(x.nbytes for x in jax.live_arrays())
        parts = decoder(model, consume=consume)
        peak, final = max(seen), sum(x.nbytes for x in jax.live_arrays())
        assert all(x.is_deleted() for x in stacked) == consume
        assert not any(x.is_deleted() for x in jax.tree.leaves((parts.state, parts.layers)))
        for i, layer in enumerate(parts.layers):
            jax.tree.map(np.testing.assert_array_equal, layer, _layer_slice(reference, i))
        largest = max(x.nbytes for x in stacked) / layer_bytes
        return (peak - before) / layer_bytes - largest, (final - before) / layer_bytes

    kept, consumed = peak_growth(False), peak_growth(True)
    assert kept[1] == pytest.approx(1.0, abs=0.01) and kept[0] > 0.5
    assert consumed[1] == pytest.approx(0.0, abs=0.01) and consumed[0] <= 0.01


def test_sampling_and_eos(hf_pair, rng):
    _, ours, cfg = hf_pair
    prompts = [list(rng.integers(3, cfg.vocab_size, 5))]
    greedy = generate(ours, prompts, 12)
    np.testing.assert_array_equal(generate(ours, prompts, 12, temperature=1.0, top_p=1e-6, seed=3), greedy)
    a = generate(ours, prompts, 12, temperature=1.5, seed=1)
    assert (a == generate(ours, prompts, 12, temperature=1.5, seed=1)).all()
    assert not (a == generate(ours, prompts, 12, temperature=1.5, seed=2)).all()
    eos = int(greedy[0, 3])
    stopped = generate(ours, prompts, 12, eos_id=eos)
    first = int(np.argmax(greedy[0] == eos))
    np.testing.assert_array_equal(stopped[0, : first + 1], greedy[0, : first + 1])
    assert (stopped[0, first + 1 :] == 0).all()
    assert truncate_at_stop("yes. Question: next", ["Question:", "\n\n"]) == "yes. "


def test_first_choice_scoring_by_hand():
    # the authors' Classification: first choice in choice order; lower-cased unless the task turns it off
    assert first_choice("The answer is B, not A", ["A", "B", "C", "D"], lowercase=False) == "A"
    assert first_choice("Yes, it does.", ["yes", "no", "maybe"]) == "yes"  # lower-casing is the default
    assert first_choice("Yes, it does.", ["yes", "no", "maybe"], lowercase=False) is None
    assert first_choice("unclear", ["yes", "no", "maybe"]) is None
    m = classification_metrics(["yes", "no", None, "yes"], ["yes", "yes", "no", "maybe"])
    assert m["accuracy"] == 0.25 and m["missing"] == 0.25 and m["examples"] == 4
    # per class F1: yes: tp=1 fp=1 fn=1 -> 0.5; no: tp=0 -> 0; maybe: 0 -> macro 1/6
    assert m["macro_f1"] == pytest.approx(0.5 / 3)


@pytest.fixture(scope="module")
def templates():
    return load_templates(shared_data("me-llama-prompts", "prompt_templates.json"))


def test_tasks_read_the_original_files(templates):
    _, examples, entry = load_task(
        "pubmedqa",
        SHARED_DATA / "pubmedqa" / "ori_pqal.json",
        templates,
        SHARED_DATA / "pubmedqa" / "test_ground_truth.json",
    )
    truth = json.loads((SHARED_DATA / "pubmedqa" / "test_ground_truth.json").read_text())
    assert len(examples) == 500 and all(truth[e.id] == e.gold for e in examples)
    prompt = render(entry["prompt"], examples[0].fields)
    assert prompt.startswith("As an expert doctor") and prompt.endswith("The answer is:\n")
    _, examples, entry = load_task("medqa", SHARED_DATA / "medqa" / "test.jsonl", templates)
    assert len(examples) == 1273 and entry["choices"] == ["A", "B", "C", "D", "E"]
    assert "\nA. " in render(entry["prompt"], examples[0].fields)
    # the authors append "?" to a question ending in neither "?" nor ".": 87 MedQA, 1,840 MedMCQA questions
    raw = [json.loads(line)["question"] for line in (SHARED_DATA / "medqa" / "test.jsonl").read_text().splitlines()]
    assert [e.fields["text"] for e in examples] == [exam_question(q) for q in raw]
    assert sum(e.fields["text"] != q for e, q in zip(examples, raw)) == 87
    _, examples, _ = load_task("medmcqa", SHARED_DATA / "medmcqa" / "test.jsonl", templates)
    assert len(examples) == 2816 and {e.gold for e in examples} <= {"A", "B", "C", "D"}
    raw = [json.loads(line)["question"] for line in (SHARED_DATA / "medmcqa" / "test.jsonl").read_text().splitlines()]
    assert sum(e.fields["text"] == q + "?" for e, q in zip(examples, raw)) == 1840


@pytest.fixture(scope="module")
def real_vocab_checkpoints(templates, tmp_path_factory):
    """A random tiny model over the LLaMA 2 vocabulary: our checkpoint and its transformers export."""
    root = tmp_path_factory.mktemp("eval-real")
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_tiny_config(2, vocab_size=32000, max_position_embeddings=512)).eval()
    hf.save_pretrained(root / "hf")
    shutil.copyfile(SHARED_DATA / "llama2-tokenizer" / "tokenizer.model", root / "hf" / "tokenizer.model")
    params = hf_to_jax(ImportRequest(root / "hf", root / "jax"), progress=False)
    return params, jax_to_hf(ExportRequest(params, root / "hf-out", dtype="float32"), progress=False)


def test_generate_command_text_matches_transformers_and_cuts_at_stop(real_vocab_checkpoints):
    """`mellama-jax generate`'s request: greedy continuations equal transformers' on the exported model; a stop
    sequence cuts each one before its first occurrence; sampling repeats with its seed."""
    params, exported = real_vocab_checkpoints
    prompts = ["Metformin is", "The patient was admitted with"]
    r = GenerateRequest(params, prompts, max_new_tokens=8, dtype="float32")
    texts = complete(r)
    assert texts == HFBackend(exported, dtype="float32").generate(prompts, 8) and len(texts[0]) >= 4
    stop = texts[0][2:4]
    assert (
        complete(GenerateRequest(params, prompts, max_new_tokens=8, stop=[stop], dtype="float32"))[0]
        == texts[0][: texts[0].find(stop)]
    )
    sampled = GenerateRequest(params, prompts, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert complete(sampled) == complete(sampled)


@pytest.mark.parametrize(
    "task,data,split",
    [
        ("pubmedqa", "pubmedqa/ori_pqal.json", "pubmedqa/test_ground_truth.json"),
        ("medqa", "medqa/test.jsonl", None),
        ("medmcqa", "medmcqa/test.jsonl", None),
    ],
)
def test_eval_backends_agree_on_the_real_files(task, data, split, real_vocab_checkpoints, tmp_path):
    params, exported = real_vocab_checkpoints
    prompts = SHARED_DATA / "me-llama-prompts" / "prompt_templates.json"
    results = {}
    for backend, model in (("jax", params), ("hf", exported)):
        results[backend] = evaluate(
            EvalRequest(
                task,
                SHARED_DATA / data,
                model,
                tmp_path / backend,
                prompts,
                backend,
                split=SHARED_DATA / split if split else None,
                limit=4,
                batch_size=2,
                max_new_tokens=6,
                dtype="float32",
            )
        )
    rows = {b: [json.loads(l) for l in (tmp_path / b / "predictions.jsonl").read_text().splitlines()] for b in results}
    assert [r["output"] for r in rows["jax"]] == [r["output"] for r in rows["hf"]]
    assert [r["prediction"] for r in rows["jax"]] == [r["prediction"] for r in rows["hf"]]
    assert results["jax"]["accuracy"] == results["hf"]["accuracy"] and results["jax"]["examples"] == 4
    assert (tmp_path / "jax" / "summary.md").read_text().startswith("| task |")
    # `eval score` on the written predictions, without the model, gives the same summary
    assert (
        main(
            [
                "eval",
                "score",
                "--task",
                task,
                "--predictions",
                str(tmp_path / "jax" / "predictions.jsonl"),
                "--out",
                str(tmp_path / "again"),
            ]
        )
        == 0
    )
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert {k: v for k, v in again.items() if k not in ("backend", "predictions")} == {
        k: results["jax"][k] for k in again if k not in ("backend", "predictions")
    }
    assert again["notes"]["macro_f1"].startswith("scikit-learn macro F1 over the labels present")


def test_eval_model_prompt_wraps_each_whole_prompt_as_the_authors_do(real_vocab_checkpoints, tmp_path):
    """--model-prompt mellama: each prompt (few-shot demonstrations included) inside the authors' wrapper,
    src/model_prompt.py:5-6 @ 08c893f2 (written out here), applied once to the whole context
    (src/evaluator.py:255-259); the default is their no_prompt."""
    from mellama_jax.eval.run import few_shot_prefix
    from mellama_jax.eval.tasks import load_task, load_templates, render

    def mellama_prompt(ctx):
        return f'Human: \n{ctx}\n\nAssistant: \n'

    params, exported = real_vocab_checkpoints
    prompts = SHARED_DATA / "me-llama-prompts" / "prompt_templates.json"
    data = SHARED_DATA / "medqa" / "test.jsonl"
    summary = evaluate(
        EvalRequest(
            "medqa",
            data,
            params,
            tmp_path / "out",
            prompts,
            limit=3,
            batch_size=3,
            max_new_tokens=6,
            fewshot=1,
            fewshot_data=data,
            model_prompt="mellama",
            dtype="float32",
        )
    )
    assert summary["model_prompt"] == "mellama"
    templates = load_templates(prompts)
    _, examples, entry = load_task("medqa", data, templates)
    prefix = few_shot_prefix("medqa", data, 1, templates)
    wrapped = [mellama_prompt(prefix + render(entry["prompt"], e.fields)) for e in examples[:3]]
    rows = [json.loads(l) for l in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["output"] for r in rows] == HFBackend(exported, dtype="float32").generate(wrapped, 6)
    with pytest.raises(ValueError, match="--model-prompt must be one of"):
        evaluate(EvalRequest("medqa", data, params, tmp_path / "bad", prompts, model_prompt="vicuna"))


def test_eval_defaults_to_the_harness_generation_length(real_vocab_checkpoints, tmp_path):
    """The authors' harness: greedy, up to 256 new tokens, no stop sequence but EOS."""
    params, _ = real_vocab_checkpoints
    summary = evaluate(
        EvalRequest(
            "medqa",
            SHARED_DATA / "medqa" / "test.jsonl",
            params,
            tmp_path / "out",
            SHARED_DATA / "me-llama-prompts" / "prompt_templates.json",
            limit=1,
        )
    )
    assert summary["max_new_tokens"] == 256
    from mellama_jax.data.tokenizer import Tokenizer

    output = json.loads((tmp_path / "out" / "predictions.jsonl").read_text())["output"]
    tokens = Tokenizer.load(SHARED_DATA / "llama2-tokenizer" / "tokenizer.model").encode(output, bos=False)
    # a random model rarely says EOS: about 256 tokens (re-encoding decoded text need not give the same pieces),
    # far past the 16-128 that tasks were cut at before
    assert 200 < len(tokens) < 320


def _row(**change):
    row = {"task": "medqa", "id": "1", "gold": "A", "choices": ["A", "B", "C", "D", "E"], "output": "A"}
    return json.dumps({**row, **change})


@pytest.mark.parametrize(
    "lines,message",
    [
        ([_row(), "{not json"], r"predictions.jsonl:2: not JSON"),
        ([_row(), _row(), _row().replace(', "output": "A"', "")], r"predictions.jsonl:3: missing field 'output'"),
        ([_row(task="medqa-5")], r"predictions.jsonl:1: unknown task 'medqa-5'"),
        ([_row(task="pubmedqa")], r"predictions.jsonl:1: a 'pubmedqa' row, but --task is 'medqa'"),
        ([_row(gold="F")], r"predictions.jsonl:1: gold 'F' is not among the choices"),
    ],
)
def test_bad_predictions_file_gets_one_line_and_writes_nothing(lines, message, tmp_path, capsys):
    path = tmp_path / "predictions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code = main(["eval", "score", "--task", "medqa", "--predictions", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.jsonl"]  # nothing written


def test_eval_score_refuses_a_multi_label_gold_outside_the_choices(tmp_path, capsys):
    """HoC rows: every gold label must be one of the row's choices, not just one of them."""
    from mellama_jax.eval.tasks import BLUE_HOC_LABELS

    row = {"task": "hoc", "id": "7", "choices": list(BLUE_HOC_LABELS), "output": "cellular energetics"}
    path = tmp_path / "predictions.jsonl"
    path.write_text(
        json.dumps({**row, "gold": ["cellular energetics", "inducing angiogenesis"]})
        + "\n"
        + json.dumps({**row, "id": "8", "gold": ["cellular energetics", "cell cycle"]})
        + "\n"
    )
    code = main(["eval", "score", "--task", "hoc", "--predictions", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "predictions.jsonl:2: gold" in err and "not among the choices" in err, err
    assert not (tmp_path / "out").exists()


def test_a_stop_sequence_at_the_very_start_leaves_nothing():
    assert truncate_at_stop("Question: next", ["Question:"]) == ""
    assert truncate_at_stop("\n\nQuestion: next", ["Question:", "\n\n"]) == ""
    assert truncate_at_stop("no stop here", ["Question:"]) == "no stop here"


def test_temperature_divides_the_logits():
    """By hand: logits (0, 1) at temperature 0.5 are (0, 2) after division, so token 1 has probability
    e^2 / (1 + e^2) = 0.881; 4,000 seeded draws land within 5 standard deviations (0.026) of it (multiplying
    instead would give 0.622)."""
    import jax
    import jax.numpy as jnp

    from mellama_jax.generate import _pick

    logits = jnp.tile(jnp.asarray([[0.0, 1.0]]), (4000, 1))
    share = float(jnp.mean(_pick(logits, jax.random.key(0), 0.5, 1.0)))
    p = np.exp(2) / (1 + np.exp(2))
    assert abs(share - p) < 5 * np.sqrt(p * (1 - p) / 4000)
