"""`mellama-jax eval`: generate greedily for every example (JAX with a KV cache, or transformers), as the
authors' harness did (up to 256 new tokens, no stop sequence but EOS), score, and write predictions.jsonl,
summary.json and summary.md (report.py)."""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from pathlib import Path

from tqdm import tqdm

from mellama_jax import storage
from mellama_jax.artifacts import require_tokenizer
from mellama_jax.data.tokenizer import Tokenizer
from mellama_jax.eval.report import (
    BERTSCORE_HELP,
    clean_subset,
    make_rows,
    overlapping_ids,
    score_rows,
    summarize,
    write,
)
from mellama_jax.eval.tasks import HARNESS_MAX_NEW_TOKENS, TASKS, load_task, load_templates, render, wrap_prompt
from mellama_jax.generate import left_pad, truncate_at_stop
from mellama_jax.inference import fit_prompt, load_for_decoding
from mellama_jax.options import NON_NEGATIVE, POSITIVE, number, option
from mellama_jax.outputs import check_destination


class JaxBackend:
    """Our model from a parameter checkpoint (hf-to-jax output or a run's params/), tokenizer beside it, loaded
    straight into the decoding mesh (`inference.load_for_decoding`)."""

    def __init__(
        self,
        params: str | Path,
        tokenizer: str | Path | None = None,
        mesh: str | None = None,
        adapters: str | Path | None = None,
        dtype: str = "bfloat16",
        batch_size: int = 1,
        truncate: bool = True,
        max_new_tokens: int = 256,
    ):
        """mesh: a layout such as "data=2,tensor=4" to decode sharded over the devices, as training does.
        adapters: a LoRA run's adapters/ (its config.yaml above names rank and targets); `params` is the base.
        truncate: cut an over-long prompt as the authors' harness did (`inference.fit_prompt`), else refuse it.
        batch_size, max_new_tokens: the largest call to expect, for the memory check before loading."""
        self.tokenizer = Tokenizer.load(require_tokenizer(params, tokenizer))
        self.model = load_for_decoding(params, adapters, dtype, mesh, batch_size, max_new_tokens)
        self.truncate, self.truncated = truncate, 0

    def generate(
        self, prompts: list[str], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0
    ) -> list[str]:
        ids = fitted(
            self, [self.tokenizer.encode(p, bos=True) for p in prompts], self.model.cfg.max_seq_len, max_new_tokens
        )
        out = self.model.generate(ids, max_new_tokens, self.tokenizer.eos_id, temperature, top_p, seed)
        return [continuation(self.tokenizer.decode, p, row) for p, row in zip(ids, out)]


def fitted(backend, prompts: list[list[int]], positions: int, max_new_tokens: int) -> list[list[int]]:
    """Each prompt within the model's positions (`inference.fit_prompt`), counted in `backend.truncated`; with
    `backend.truncate` off, an over-long prompt is refused in one line instead."""
    out = []
    for i, ids in enumerate(prompts):
        kept, cut = fit_prompt(ids, positions, max_new_tokens)
        if cut and not backend.truncate:
            raise ValueError(
                f"prompt {i + 1} has {len(ids)} tokens; with {max_new_tokens} new tokens it needs "
                f"{len(ids) + max_new_tokens} positions, the model has {positions}: shorten it, lower "
                f"--max-new-tokens, or pass --truncate (keeps BOS and its last {len(kept) - 1} tokens)"
            )
        backend.truncated += cut
        out.append(kept)
    return out


DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    """One `generate` call: what `mellama-jax generate` parses, and what `complete` takes."""

    model: str | Path = option(help="a parameter checkpoint (hf-to-jax output, a run's params/)")
    prompt: tuple[str, ...] = option(help="repeatable: one batch of prompts", append=True)
    tokenizer: str | Path | None = option(None, "tokenizer.model (default: found beside the checkpoint)")
    max_new_tokens: int = option(64, type=POSITIVE)
    temperature: float = option(0.0, "0: greedy", type=number(float, 0.0))
    top_p: float = option(1.0, "in (0, 1]", type=number(float, 0.0, 1.0, low_open=True))
    seed: int = option(0, type=int)
    stop: tuple[str, ...] | None = option(None, "stop sequence (repeatable)", append=True)
    mesh: str | None = option(None, 'decode sharded over the devices, e.g. "data=4,tensor=2"')
    adapters: str | Path | None = option(None, "a LoRA run's adapters/ directory (--model is then the base)")
    dtype: str = option(
        "bfloat16", "parameters and computation (default bfloat16, as LLaMA2 ships; logits in float32)", choices=DTYPES
    )
    truncate: bool = option(
        False, "a prompt too long for the model keeps BOS and its last tokens (as `eval` does) instead of being refused"
    )


def complete(r: GenerateRequest) -> list[str]:
    """The continuation of each prompt, cut at the first stop sequence."""
    backend = JaxBackend(r.model, r.tokenizer, r.mesh, r.adapters, r.dtype, len(r.prompt), r.truncate, r.max_new_tokens)
    texts = backend.generate(list(r.prompt), r.max_new_tokens, r.temperature, r.top_p, r.seed)
    return [truncate_at_stop(text, r.stop or ()) for text in texts]


def continuation(decode, prompt_ids: list[int], new_ids) -> str:
    """The generated text as it reads after the prompt (SentencePiece drops a leading space when the new tokens
    are decoded alone, so decode the whole sequence and cut the decoded prompt off)."""
    new = [int(t) for t in new_ids if t != 0]
    whole, prompt = decode(list(prompt_ids) + new), decode(list(prompt_ids))
    return whole[len(prompt) :] if whole.startswith(prompt) else decode(new)


class HFBackend:
    """transformers on a Hugging Face directory (e.g. `convert jax-to-hf` output), CPU or CUDA.

    tokenizer="sentencepiece" (default when the directory has tokenizer.model) encodes and decodes with
    SentencePiece, as training and Meta's reference do; "transformers" uses AutoTokenizer, whose LLaMA tokenizer
    in transformers 5 splits runs of spaces differently ("a  b": [259, 1609] where SentencePiece gives
    [29871, 491]), so on such prompts the two backends see different tokens.
    """

    def __init__(self, hf_dir: str | Path, tokenizer: str = "sentencepiece", dtype: str = "bfloat16"):
        # here, not at the top: the hf backend's torch and transformers come with the optional interop extra
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.sp = self.tokenizer = None
        if tokenizer == "sentencepiece" and (Path(hf_dir) / "tokenizer.model").exists():
            self.sp = Tokenizer.load(Path(hf_dir) / "tokenizer.model")
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).to(self.device).eval()
        self.truncate, self.truncated = True, 0

    def _encode(self, prompts: list[str]) -> list[list[int]]:
        if self.sp is not None:
            return [self.sp.encode(p, bos=True) for p in prompts]
        return [self.tokenizer(p)["input_ids"] for p in prompts]

    def _decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids) if self.sp is not None else self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        encoded = fitted(self, self._encode(prompts), self.model.config.max_position_embeddings, max_new_tokens)
        ids, mask = left_pad(encoded, 0)  # LLaMA has no pad token; padded positions are masked
        ids, mask = (self.torch.tensor(a, dtype=self.torch.long, device=self.device) for a in (ids, mask))
        with self.torch.no_grad():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
            )
        return [continuation(self._decode, p, row[ids.shape[1] :].tolist()) for p, row in zip(encoded, out)]


def few_shot_prefix(
    task: str, data: str | Path | None, k: int, templates: dict, seed: int = 0, split: str | Path | None = None
) -> str:
    """k demonstrations drawn (seeded) from a training file: each its rendered prompt and its gold answer."""
    if k <= 0:
        return ""
    if data is None:
        raise ValueError("few-shot evaluation needs the training split's file (--fewshot-data)")
    _, pool, entry = load_task(task, data, templates, split)
    if len(pool) < k:
        raise ValueError(f"{data}: {len(pool)} examples, fewer than the {k} demonstrations asked for")
    return "".join(render(entry["prompt"], d.fields) + d.answer + "\n\n" for d in random.Random(seed).sample(pool, k))


@dataclasses.dataclass(frozen=True)
class EvalRequest:
    """One `eval` run: what `mellama-jax eval` parses, and what `evaluate` takes."""

    task: str = option(choices=sorted(TASKS))
    data: str | Path = option(help="the dataset's original file or folder (docs/evaluation.md)")
    model: str | Path = option(help="jax: a parameter checkpoint; hf: a Hugging Face directory")
    out: str | Path = option()
    prompts: str | Path | None = option(None, "the authors' prompt_templates.json (needed for all but i2b2 and bionli)")
    backend: str = option("jax", choices=["jax", "hf"])
    split: str | Path | None = option(None, "PubMedQA: the split's id -> label file (test_ground_truth.json)")
    limit: int | None = option(None, "the first N examples", type=POSITIVE)
    batch_size: int = option(8, type=POSITIVE)
    max_new_tokens: int | None = option(None, "default 256 for every task, as the authors' harness", type=POSITIVE)
    fewshot: int = option(0, "k demonstrations from --fewshot-data (default 0)", type=NON_NEGATIVE)
    fewshot_data: str | Path | None = option(None, "the training split's file, same format as --data")
    seed: int = option(0, "which few-shot demonstrations are drawn", type=int)
    mesh: str | None = option(None, 'jax: decode sharded over the devices, e.g. "data=4,tensor=2"')
    dtype: str = option(
        "bfloat16", "both backends: parameters and computation (default bfloat16, as LLaMA2 ships)", choices=DTYPES
    )
    bertscore_model: str | None = option(None, BERTSCORE_HELP)
    hf_tokenizer: str = option(
        "sentencepiece",
        "hf backend: tokenise with tokenizer.model as training did (default) or AutoTokenizer",
        choices=["sentencepiece", "transformers"],
    )
    adapters: str | Path | None = option(None, "jax: a LoRA run's adapters/ directory (--model is then the base)")
    tokenizer: str | Path | None = option(None, "jax: tokenizer.model (default: found with the parameters)")
    # the authors' chat wrapper around each whole prompt; "mellama" is the format our chat-LoRA recipes tune in
    model_prompt: str = option(
        "none",
        "wrap each whole prompt as the authors' eval.py --model_prompt: none (their "
        "default) or mellama ('Human: \\n{prompt}\\n\\nAssistant: \\n', for chat "
        "models tuned with `prepare instruct --template mellama`)",
        choices=["none", "mellama"],
    )
    overwrite: bool = option(False, "replace an earlier eval output at --out")
    overlap: str | Path | None = option(
        None,
        "`prepare overlap`'s overlap.json: also score the examples it found "
        "no training document overlapping (summary.json: clean)",
    )


def evaluate(r: EvalRequest) -> dict:
    inputs = [r.data, r.split, r.fewshot_data]
    wrap_prompt("", r.model_prompt)  # an unknown wrapper fails here, before the model loads
    check_destination(r.out, "eval", r.overwrite, inputs)  # before hours of decoding, not after
    dirty = overlapping_ids(r.overlap, r.task) if r.overlap else set()
    templates = load_templates(r.prompts)
    definition, examples, entry = load_task(r.task, r.data, templates, r.split)
    examples = examples[: r.limit] if r.limit else examples
    prefix = few_shot_prefix(r.task, r.fewshot_data, r.fewshot, templates, r.seed)
    max_new_tokens = r.max_new_tokens or HARNESS_MAX_NEW_TOKENS
    model = storage.fetch(r.model, context=3)  # from a bucket: into the local cache, with its run's files
    adapters = storage.fetch(r.adapters, context=3) if r.adapters else None
    runner = (
        JaxBackend(model, r.tokenizer, r.mesh, adapters, r.dtype, r.batch_size, max_new_tokens=max_new_tokens)
        if r.backend == "jax"
        else HFBackend(model, r.hf_tokenizer, r.dtype)
    )
    texts = [wrap_prompt(prefix + render(entry["prompt"], e.fields), r.model_prompt) for e in examples]
    outputs, times = _generate_all(runner, texts, r.batch_size, max_new_tokens, f"{r.task} ({r.backend})")
    rows = make_rows(definition, examples, outputs, entry.get("choices"))
    predictions, metrics = score_rows(definition, rows, r.bertscore_model)
    after_first = len(examples) - min(r.batch_size, len(examples))
    if runner.truncated:
        print(
            f"eval: {runner.truncated} of {len(texts)} prompts did not fit the model's positions with "
            f"{max_new_tokens} new tokens; each kept BOS and its last tokens, as the authors' harness did "
            "(summary.json: truncated_prompts)",
            file=sys.stderr,
        )
    run = {
        "backend": r.backend,
        "model": str(r.model),
        "data": str(r.data),
        "fewshot": r.fewshot,
        "model_prompt": r.model_prompt,
        "max_new_tokens": max_new_tokens,
        "dtype": r.dtype,
        "truncated_prompts": runner.truncated,
    }
    speed = {
        "examples_per_s": len(examples) / sum(times),
        # the first batch includes JAX's compilation
        "examples_per_s_after_first_batch": after_first / sum(times[1:]) if after_first else None,
    }
    summary = {**summarize(definition, metrics, run), **speed}
    if r.overlap:
        summary["clean"] = {"report": str(r.overlap), **clean_subset(definition, rows, dirty, r.bertscore_model)}
    write(r.out, rows, predictions, summary, inputs=inputs, overwrite=r.overwrite)
    return summary


def _generate_all(runner, texts: list[str], batch_size: int, max_new_tokens: int, desc: str):
    """Outputs in the order of `texts`, and seconds per batch. Batches of similar length: less padding, and
    few distinct padded widths (compiled shapes)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    outputs, times = [""] * len(texts), []
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        began = time.perf_counter()
        batch = order[start : start + batch_size]
        for i, text in zip(batch, runner.generate([texts[i] for i in batch], max_new_tokens)):
            outputs[i] = text
        times.append(time.perf_counter() - began)
    return outputs, times
