"""`mellama-jax eval`: generate greedily for every example (JAX with a KV cache, or transformers), score,
and write predictions.jsonl, summary.json and summary.md."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tqdm import tqdm

from mellama_jax.eval.scoring import classification_metrics, first_choice
from mellama_jax.eval.tasks import TASKS, load_templates


class JaxBackend:
    """Our model from a parameter checkpoint (hf-to-jax output or a run's params/), tokenizer beside it."""

    def __init__(self, params: str | Path, tokenizer: str | Path | None = None):
        from flax import nnx

        from mellama_jax.convert.api import _find_model_config, _find_tokenizer
        from mellama_jax.data.tokenizer import Tokenizer
        from mellama_jax.model import init_abstract
        from mellama_jax.train.checkpoint import load_params_local

        params = Path(params)
        cfg = dataclasses.replace(_find_model_config(params)[0], param_dtype="float32", dtype="float32")
        graphdef, abstract = nnx.split(init_abstract(cfg))
        self.model = nnx.merge(graphdef, load_params_local(params, abstract))
        self.tokenizer = Tokenizer.load(tokenizer or _find_tokenizer(params))

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        from mellama_jax.generate import generate

        ids = [self.tokenizer.encode(p, bos=True) for p in prompts]
        out = generate(self.model, ids, max_new_tokens, eos_id=self.tokenizer.eos_id)
        return [self.continuation(p, row) for p, row in zip(ids, out)]

    def continuation(self, prompt_ids: list[int], new_ids) -> str:
        """The generated text as it reads after the prompt (SentencePiece drops a leading space when the new
        tokens are decoded alone, so decode the whole sequence and cut the prompt off)."""
        new = [int(t) for t in new_ids if t != 0]
        whole, prompt = self.tokenizer.decode(prompt_ids + new), self.tokenizer.decode(prompt_ids)
        return whole[len(prompt):] if whole.startswith(prompt) else self.tokenizer.decode(new)


class HFBackend:
    """transformers on a Hugging Face directory (e.g. `convert jax-to-hf` output), CPU or CUDA."""

    def __init__(self, hf_dir: str | Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:  # LLaMA has no pad token; padded positions are masked anyway
            self.tokenizer.pad_token = self.tokenizer.unk_token
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(self.device).eval()

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self.torch.no_grad():
            out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        texts = []
        for prompt_row, row in zip(batch["input_ids"], out):
            # as JaxBackend.continuation: decode everything, cut the decoded prompt off
            whole = self.tokenizer.decode(row, skip_special_tokens=True)
            prompt = self.tokenizer.decode(prompt_row, skip_special_tokens=True)
            texts.append(whole[len(prompt):] if whole.startswith(prompt) else
                         self.tokenizer.decode(row[len(prompt_row):], skip_special_tokens=True))
        return texts


def evaluate(task: str, data: str | Path, model: str | Path, prompts: str | Path, out_dir: str | Path,
             backend: str = "jax", split: str | Path | None = None, limit: int | None = None,
             batch_size: int = 8, max_new_tokens: int = 16) -> dict:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; implemented: {sorted(TASKS)}")
    definition = TASKS[task]
    examples, choices = definition.load(data, load_templates(prompts), split)
    examples = examples[:limit] if limit else examples
    runner = JaxBackend(model) if backend == "jax" else HFBackend(model)
    outputs = []
    for start in tqdm(range(0, len(examples), batch_size), desc=f"{task} ({backend})", unit="batch"):
        outputs += runner.generate([e.prompt for e in examples[start:start + batch_size]], max_new_tokens)
    predictions = [first_choice(o, choices, definition.lowercase) for o in outputs]
    metrics = classification_metrics(predictions, [e.gold for e in examples], choices)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w") as f:
        for e, o, p in zip(examples, outputs, predictions):
            f.write(json.dumps({"id": e.id, "gold": e.gold, "prediction": p, "output": o}) + "\n")
    summary = {"task": task, "backend": backend, "model": str(model), **metrics}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(
        "| task | backend | examples | accuracy | macro-F1 | missing |\n|---|---|---|---|---|---|\n"
        f"| {task} | {backend} | {metrics['examples']} | {metrics['accuracy']:.4f} | {metrics['macro_f1']:.4f} "
        f"| {metrics['missing']:.4f} |\n")
    return summary
