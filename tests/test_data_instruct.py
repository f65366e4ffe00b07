"""Instruction data: formats, templates, response-only loss weights, truncation, packing, batches."""

import json

import numpy as np
import pytest
from conftest import SHARED_DATA

from mellama_jax.data.corpus import BadRecord, Report
from mellama_jax.data.instruct import (
    TEMPLATES,
    InstructDataRequest,
    parse_record,
    prepare_instruct,
    read_conversations,
    render,
)
from mellama_jax.data.instruct_batches import instruct_batches
from mellama_jax.data.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def llama_tok(llama2_tokenizer_path):
    return Tokenizer.load(llama2_tokenizer_path)


def test_chatdoctor_weights_are_exactly_the_responses(llama_tok):
    report = Report()
    path = SHARED_DATA / "chatdoctor" / "chatdoctor5k.json"
    raw = json.loads(path.read_text())
    checked = 0
    for (where, conv), record in zip(read_conversations(path, report), raw):
        ids, weights = render(conv, TEMPLATES["llama2_chat"], llama_tok)
        weighted = [t for t, w in zip(ids, weights) if w]
        assert weighted == llama_tok.encode(record["output"].strip()) + [llama_tok.eos_id], where
        prompt = llama_tok.decode([t for t, w in zip(ids, weights) if not w])
        assert prompt.startswith("[INST]") and record["instruction"].strip()[:20] in prompt
        checked += 1
        if checked == 300:
            break
    assert checked == 300 and not report.skipped


def test_multi_turn_weights_every_assistant_turn_and_no_user_turn(llama_tok):
    conv = parse_record(
        {
            "messages": [
                {"role": "system", "content": "You are a careful clinician."},
                {"role": "user", "content": "I have a cough."},
                {"role": "assistant", "content": "For how long?"},
                {"role": "user", "content": "Two weeks."},
                {"role": "assistant", "content": "Please get a chest X-ray."},
            ]
        }
    )
    ids, weights = render(conv, TEMPLATES["llama2_chat"], llama_tok)
    runs, current = [], []
    for t, w in zip(ids, weights):
        if w:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    runs.append(current)
    eos = llama_tok.eos_id
    assert runs == [llama_tok.encode("For how long?") + [eos], llama_tok.encode("Please get a chest X-ray.") + [eos]]
    assert ids.count(llama_tok.bos_id) == 2  # LLaMA-2 chat: <s>[INST] ... [/INST] answer</s> per turn
    assert "<<SYS>>\nYou are a careful clinician.\n<</SYS>>" in llama_tok.decode(ids[: weights.index(1)])


def test_alpaca_template_and_self_instruct_layout(llama_tok, tmp_path):
    report = Report()
    convs = list(read_conversations(SHARED_DATA / "self-instruct" / "seed_tasks.jsonl", report))
    assert len(convs) >= 175 and not report.skipped
    conv = parse_record({"instruction": "Name the drug class.", "input": "metformin", "output": "Biguanide."})
    ids, weights = render(conv, TEMPLATES["alpaca"], llama_tok, train_on_eos=False)
    text = llama_tok.decode(ids)
    assert "### Instruction:\nName the drug class.\n\n### Input:\nmetformin\n\n### Response:" in text
    assert [t for t, w in zip(ids, weights) if w] == llama_tok.encode("Biguanide.")


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"instruction": "x"}, "missing field: 'output'"),
        ({"prompt": "x", "response": ""}, "empty text"),
        ({"conversations": [{"from": "gpt", "value": "hi"}]}, "invalid conversation"),
        ({"conversations": "nope"}, "missing field"),
        ({"text": "plain"}, "unknown format"),
    ],
)
def test_bad_records_name_the_problem(record, reason):
    with pytest.raises(ValueError, match=reason):
        parse_record(record)


def test_prepare_counts_skips_and_truncation(tmp_path, llama2_tokenizer_path):
    path = tmp_path / "mixed.jsonl"
    long_prompt = "symptom " * 200
    path.write_text(
        "\n".join(
            [
                json.dumps({"instruction": "What is fever?", "output": "A raised body temperature."}),
                "{not json",
                json.dumps({"instruction": long_prompt, "output": "Rest."}),
                json.dumps({"instruction": "Explain.", "output": "word " * 100}),
                json.dumps({"prompt": "Dose?", "response": "500 mg."}),
            ]
        )
        + "\n"
    )
    m = prepare_instruct(InstructDataRequest([path], llama2_tokenizer_path, tmp_path / "out", seq_len=64))
    assert m["report"]["documents"] == 3 and m["truncated"] == 1
    assert m["report"]["skipped"] == {"invalid JSON": 1, "response truncated away": 1}
    assert f"{path}:3: response truncated away" in "\n".join(m["report"]["skipped_examples"])
    m = prepare_instruct(
        InstructDataRequest([path], llama2_tokenizer_path, tmp_path / "drop", seq_len=64, truncation="drop")
    )
    assert m["report"]["skipped"] == {"invalid JSON": 1, "too long": 2}
    with pytest.raises(BadRecord, match=f"{path}:2: invalid JSON"):
        prepare_instruct(
            InstructDataRequest([path], llama2_tokenizer_path, tmp_path / "strict", seq_len=64, strict=True)
        )


@pytest.mark.parametrize("pack", [False, True])
def test_batches_weight_only_response_targets(tmp_path, llama2_tokenizer_path, llama_tok, pack):
    path = tmp_path / "qa.jsonl"
    rows = [{"prompt": f"Question {i} about dosing?", "response": f"Answer number {i} is 5 mg."} for i in range(12)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    m = prepare_instruct(InstructDataRequest([path], llama2_tokenizer_path, tmp_path / "out", seq_len=64, pack=pack))
    assert (m["rows"] < 12) == pack
    ds = instruct_batches(tmp_path / "out", 64, global_batch=1, epochs=1, seed=0)
    seen = []
    for k in range(len(ds)):
        b = ds[k]
        for r in range(1):
            w, t, seg = b["loss_weights"][r], b["targets"][r], b["segment_ids"][r]
            assert not np.any(w[seg == 0])
            for s in np.unique(seg[seg > 0]):
                idx = np.flatnonzero(seg == s)
                assert (b["positions"][r][idx] == np.arange(len(idx))).all()
                seen.append(llama_tok.decode(t[idx][w[idx] > 0]))
    assert sorted(seen) == sorted(r["response"] for r in rows)  # each response once, nothing else weighted


# The Me-LLaMA authors' own records and chat wrapper (BIDS-Xu-Lab/Me-LLaMA @ 08c893f2), written out here as their
# code writes them, independently of our reader: src/preprocess_instruct.py:43-47 and src/model_prompt.py:5-6.
def authors_record(dataset, index, prompt, answer):
    return {
        "id": f"{dataset}{index}",
        "conversations": [{"from": "human", "value": prompt}, {"from": "agent", "value": answer}],
        "text": prompt,
    }


def mellama_prompt(ctx):
    return f'Human: \n{ctx}\n\nAssistant: \n'


def authors_mednli_examples():
    entry = json.loads((SHARED_DATA / "me-llama-prompts" / "prompt_templates.json").read_text())["MedNLI"]
    pairs = [
        ("Premise: He denies chest pain. Hypothesis: The patient has angina.", "contradiction"),
        ("Premise: Creatinine rose to 2.1. Hypothesis: The patient has kidney injury.", "entailment"),
        ("Premise: She was started on heparin. Hypothesis: She has a history of smoking.", "neutral"),
    ]
    return [(entry["prompt"].format(text=text), label) for text, label in pairs]


@pytest.mark.parametrize("template", ["llama2_chat", "mellama"])
def test_the_authors_records_prepare_like_the_same_sharegpt_conversations(tmp_path, llama2_tokenizer_path, template):
    examples = authors_mednli_examples()
    theirs, sharegpt = tmp_path / "instructions.jsonl", tmp_path / "sharegpt.json"
    theirs.write_text(
        "".join(json.dumps(authors_record("MedNLI", i, p, a)) + "\n" for i, (p, a) in enumerate(examples))
    )
    sharegpt.write_text(
        json.dumps(
            [{"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": a}]} for p, a in examples]
        )
    )
    outs = []
    for path in (theirs, sharegpt):
        out = tmp_path / f"out-{path.stem}"
        m = prepare_instruct(InstructDataRequest([path], llama2_tokenizer_path, out, seq_len=256, template=template))
        assert m["report"]["documents"] == 3 and m["report"]["skipped_total"] == 0
        outs.append(
            [
                np.frombuffer(r, np.int32)
                for r in __import__("grain").sources.ArrayRecordDataSource([str(out / "examples.arrayrecord")])
            ]
        )
    assert len(outs[0]) == 3 and all((a == b).all() for a, b in zip(*outs))


def test_the_mellama_template_is_the_authors_wrapper_token_for_token(llama_tok):
    for prompt, answer in authors_mednli_examples():
        conv = parse_record(authors_record("MedNLI", 0, prompt, answer))
        ids, weights = render(conv, TEMPLATES["mellama"], llama_tok)
        # their prompt keeps its own leading and trailing newlines inside the wrapper
        expected = [llama_tok.bos_id] + llama_tok.encode(mellama_prompt(prompt)) + llama_tok.encode(answer)
        assert ids == expected + [llama_tok.eos_id]
        assert [t for t, w in zip(ids, weights) if w] == llama_tok.encode(answer) + [llama_tok.eos_id]


def test_each_epoch_is_a_new_shuffle_of_every_example(tmp_path, llama2_tokenizer_path, llama_tok):
    path = tmp_path / "qa.jsonl"
    rows = [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(24)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    prepare_instruct(InstructDataRequest([path], llama2_tokenizer_path, tmp_path / "out", seq_len=32))
    ds = instruct_batches(tmp_path / "out", 32, global_batch=4, epochs=3, seed=1)
    answers = [
        llama_tok.decode(b["targets"][r][b["loss_weights"][r] > 0])
        for k in range(len(ds))
        for b in [ds[k]]
        for r in range(4)
    ]
    epochs = [answers[e * 24 : (e + 1) * 24] for e in range(3)]
    for epoch in epochs:  # each epoch: every example exactly once
        assert sorted(epoch) == sorted(r["response"] for r in rows)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]


def test_json_lines_under_a_json_name_are_read(tmp_path):
    """`datasets`' to_json writes JSON Lines even under a .json name: the reader tells them from a JSON list by
    the first byte, not by the suffix alone."""
    rows = [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(3)]
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "list.json").write_text(json.dumps(rows))
    for name in ("lines.json", "list.json"):
        report = Report()
        convs = [c for _, c in read_conversations(tmp_path / name, report)]
        assert [c.turns[0][1] for c in convs] == [r["output"] for r in rows] and not report.skipped, name


def test_packing_fills_a_row_exactly(tmp_path, llama2_tokenizer_path, llama_tok):
    """Two examples whose tokens add up to seq_len share one row; one token more starts a second row."""
    path = tmp_path / "qa.jsonl"
    rows = [
        {"prompt": "Dose of metformin?", "response": "500 mg twice daily."},
        {"prompt": "Class of statins?", "response": "HMG-CoA reductase inhibitors."},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    lengths = [len(render(parse_record(r), TEMPLATES["llama2_chat"], llama_tok)[0]) for r in rows]
    exact = prepare_instruct(
        InstructDataRequest([path], llama2_tokenizer_path, tmp_path / "exact", seq_len=sum(lengths), pack=True)
    )
    over = prepare_instruct(
        InstructDataRequest(
            [path], llama2_tokenizer_path, tmp_path / "over", seq_len=sum(lengths) - 1, pack=True, truncation="drop"
        )
    )
    assert exact["rows"] == 1 and over["rows"] == 2
