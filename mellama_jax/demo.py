"""The demo: the paper's pipeline in miniature on the CPU, with 8 simulated devices, from files shipped in the
package (no downloads): tokenizer -> continual pretraining on a 15:1:4 biomedical/clinical/general mixture ->
LoRA instruction tuning -> merged Hugging Face export -> transformers loads it and answers a question.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from importlib import resources
from pathlib import Path

import jax
from flax import nnx

from mellama_jax.config import CONFIG_ROOT, load_config
from mellama_jax.convert.export import export_hf, memory_fetch, merged_fetch
from mellama_jax.data.corpus import Report
from mellama_jax.data.instruct import TEMPLATES, InstructDataRequest, prepare_instruct, read_conversations
from mellama_jax.data.prepare import PretrainDataRequest, prepare_pretrain, summarize
from mellama_jax.data.tokenizer import Tokenizer
from mellama_jax.eval.run import GenerateRequest, complete
from mellama_jax.model.loading import load_model
from mellama_jax.outputs import MARKER, check_destination
from mellama_jax.plot import read_metrics
from mellama_jax.train.loop import train

SOURCES = ("biomedical", "clinical", "general")
QUESTIONS = ("Name the enzyme that statins inhibit.", "What does metformin do in type 2 diabetes?")


def _demo_file(name: str) -> Path:
    return Path(str(resources.files("mellama_jax") / "demo_data" / name))


def sample_texts() -> dict[str, list[str]]:
    return {
        name: [
            json.loads(line)["text"] for line in _demo_file(f"{name}.jsonl").read_text().splitlines() if line.strip()
        ]
        for name in SOURCES
    }


def run_demo(out: str | Path, devices: int = 8) -> dict:
    jax.config.update("jax_num_cpu_devices", devices)  # before anything touches the backend

    started = time.perf_counter()
    out = check_destination(out, "demo", overwrite=True)  # a previous demo's output is replaced, nothing else
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / MARKER).write_text(json.dumps({"kind": "demo"}))
    try:
        return _run(out, started)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # no partial demo output survives a failure
        raise


def _run(out: Path, started: float) -> dict:
    print(f"== mellama-jax demo: {jax.device_count()} simulated {jax.devices()[0].platform} devices; output in {out}")
    instructions = [c for _, c in read_conversations(_demo_file("instructions.jsonl"), Report())]
    tokenizer_dir = _tokenizer_and_data(out, instructions)
    result = _pretrain(out)
    lora, lresult = _instruction_tune(out, result["export"])
    hf_dir = _export_merged(lora, result["export"], lresult["export"], tokenizer_dir, out / "hf")
    print(f"5. export: merged model in Hugging Face format -> {hf_dir}")
    answers = _answers(hf_dir, result["export"], lresult["export"])
    reference = {c.turns[0][0]: c.turns[0][1] for c in instructions}
    for question, answer in zip(QUESTIONS, answers):
        print(f"   Q: {question}\n   A: {answer}\n   (training answer: {reference[question]})")
    print(f"== done in {time.perf_counter() - started:.0f}s. Curves: {out}/pretrain/loss.png, {out}/lora/loss.png")
    return {"pretrain": result, "lora": lresult, "hf": str(hf_dir), "answers": answers}


def _tokenizer_and_data(out: Path, instructions: list) -> Path:
    """Steps 1 and 2: a tokenizer trained on the sample, the pretraining mixture and the instructions prepared."""
    texts = [t for lines in sample_texts().values() for t in lines]
    texts += [part for c in instructions for turn in c.turns for part in turn]
    tokenizer_dir = out / "tokenizer"
    Tokenizer.train(texts, vocab_size=512).save(tokenizer_dir)
    print(f"1. tokenizer: SentencePiece BPE, 512 pieces -> {tokenizer_dir}/tokenizer.model")
    manifest = prepare_pretrain(
        PretrainDataRequest({s: [_demo_file(f"{s}.jsonl")] for s in SOURCES}, tokenizer_dir, out / "data" / "pretrain"),
        progress=False,
    )
    inst = prepare_instruct(
        InstructDataRequest([_demo_file("instructions.jsonl")], tokenizer_dir, out / "data" / "instruct", 96)
    )
    print(
        "2. data: "
        + summarize(manifest).replace("\n", "; ")
        + f"; instructions: {inst['rows']} examples, {inst['response_tokens']} response tokens"
    )
    return tokenizer_dir


def _pretrain(out: Path) -> dict:
    """Step 3: continual pretraining on the mixture; the result names the exported parameters."""
    pre = load_config(
        CONFIG_ROOT / "tiny-pretrain.yaml",
        [f"data.path={out}/data/pretrain", f"run.dir={out}/pretrain", "train.epochs=50", "run.progress=false"],
    )
    result = train(pre)
    first, last = _first_last_loss(out / "pretrain")
    start, end = result["held_out_at_step_0"], result["held_out"]
    by_source = ", ".join(f"{k[5:]} {start[k]:.2f} -> {end[k]:.2f}" for k in end if k.startswith("loss/"))
    print(
        f"3. continual pretraining: {result['steps']} steps, train loss {first:.2f} -> {last:.2f}, held-out loss "
        f"{start['loss']:.2f} -> {result['eval_loss']:.2f} ({by_source}); parameters -> {result['export']}"
    )
    return result


def _instruction_tune(out: Path, base: str) -> tuple:
    """Step 4: LoRA on the instructions over the pretrained parameters: (its config, its result)."""
    lora = load_config(
        CONFIG_ROOT / "tiny-lora.yaml",
        [
            f"data.path={out}/data/instruct",
            f"run.dir={out}/lora",
            f"train.init_from={base}",
            "train.seq_len=96",
            "train.epochs=100",
            "optimizer.learning_rate=1e-2",
            "run.progress=false",
        ],
    )
    lresult = train(lora)
    first, last = _first_last_loss(out / "lora")
    print(
        f"4. LoRA instruction tuning: {lresult['steps']} steps, response loss {first:.2f} -> {last:.2f}; "
        f"adapters -> {lresult['export']}"
    )
    return lora, lresult


def _answers(hf_dir: Path, base: str, adapters: str) -> list[str]:
    """Step 6: the questions answered greedily by transformers on the export (or by us, without transformers)."""
    if _has_transformers():
        answers = _answer_with_transformers(hf_dir, QUESTIONS)
        print(f"6. transformers: AutoModelForCausalLM.from_pretrained({str(hf_dir)!r}), greedy:")
    else:  # a plain `pip install mellama-jax`: the PyTorch tools come with the interop extra
        answers = _answer_with_mellama(base, adapters, QUESTIONS)
        print(
            "6. mellama-jax generate on the base + adapters, greedy (transformers is not installed: "
            "`pip install 'mellama-jax[interop]'` has it load the export instead):"
        )
    return answers


def _first_last_loss(run_dir: Path) -> tuple[float, float]:
    losses = [r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"]
    return losses[0], losses[-1]


def _export_merged(cfg, base_params: str, adapters: str, tokenizer_dir: Path, out: Path) -> Path:
    model = load_model(base_params, adapters, dtype=cfg.model.param_dtype)
    _, lora_state, base_state = nnx.split(model, nnx.LoRAParam, ...)
    fetch = merged_fetch(
        memory_fetch(nnx.to_pure_dict(base_state)), memory_fetch(nnx.to_pure_dict(lora_state)), cfg.lora
    )
    return export_hf(fetch, cfg.model, out, tokenizer_dir / "tokenizer.model", dtype="float32")


def _has_transformers() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))


def _prompt(question: str) -> str:
    """The question as the demo's instruction data was rendered for training (InstructDataRequest's template)."""
    return TEMPLATES[InstructDataRequest.template].user_format.format(user=question)


def _answer_with_mellama(base_params: str, adapters: str, questions) -> list[str]:
    request = GenerateRequest(base_params, [_prompt(q) for q in questions], max_new_tokens=32, adapters=adapters)
    return [answer.strip() for answer in complete(request)]


def _answer_with_transformers(hf_dir: Path, questions) -> list[str]:
    # only when installed (the interop extra), as _has_transformers checked
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    answers = []
    for question in questions:
        inputs = tokenizer(_prompt(question), return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=32, do_sample=False, pad_token_id=0)
        answers.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return answers
