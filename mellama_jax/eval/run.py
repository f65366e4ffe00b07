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
from mellama_jax.eval.report import clean_subset, make_rows, overlapping_ids, score_rows, summarize, write
from mellama_jax.eval.tasks import HARNESS_MAX_NEW_TOKENS, load_task, load_templates, render, wrap_prompt
from mellama_jax.outputs import check_destination


class JaxBackend:
    """Our model from a parameter checkpoint (hf-to-jax output or a run's params/), tokenizer beside it, loaded
    straight into the decoding mesh (`inference.load_for_decoding`)."""

    def __init__(self, params: str | Path, tokenizer: str | Path | None = None, mesh: str | None = None,
                 adapters: str | Path | None = None, dtype: str = "bfloat16", batch_size: int = 1,
                 truncate: bool = True, max_new_tokens: int = 256):
        """mesh: a layout such as "data=2,tensor=4" to decode sharded over the devices, as training does.
        adapters: a LoRA run's adapters/ (its config.yaml above names rank and targets); `params` is the base.
        truncate: cut an over-long prompt as the authors' harness did (`inference.fit_prompt`), else refuse it.
        batch_size, max_new_tokens: the largest call to expect, for the memory check before loading."""
        from mellama_jax.data.tokenizer import Tokenizer
        from mellama_jax.inference import load_for_decoding

        self.tokenizer = Tokenizer.load(require_tokenizer(params, tokenizer))
        self.model = load_for_decoding(params, adapters, dtype, mesh, batch_size, max_new_tokens)
        self.truncate, self.truncated = truncate, 0

    def generate(self, prompts: list[str], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0) -> list[str]:
        ids = fitted(self, [self.tokenizer.encode(p, bos=True) for p in prompts], self.model.cfg.max_seq_len,
                     max_new_tokens)
        out = self.model.generate(ids, max_new_tokens, self.tokenizer.eos_id, temperature, top_p, seed)
        return [continuation(self.tokenizer.decode, p, row) for p, row in zip(ids, out)]


def fitted(backend, prompts: list[list[int]], positions: int, max_new_tokens: int) -> list[list[int]]:
    """Each prompt within the model's positions (`inference.fit_prompt`), counted in `backend.truncated`; with
    `backend.truncate` off, an over-long prompt is refused in one line instead."""
    from mellama_jax.inference import fit_prompt

    out = []
    for i, ids in enumerate(prompts):
        kept, cut = fit_prompt(ids, positions, max_new_tokens)
        if cut and not backend.truncate:
            raise ValueError(f"prompt {i + 1} has {len(ids)} tokens; with {max_new_tokens} new tokens it needs "
                             f"{len(ids) + max_new_tokens} positions, the model has {positions}: shorten it, lower "
                             f"--max-new-tokens, or pass --truncate (keeps BOS and its last {len(kept) - 1} tokens)")
        backend.truncated += cut
        out.append(kept)
    return out


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    """One `generate` call: what `mellama-jax generate` parses, and what `complete` takes."""

    model: str | Path  # a parameter folder (hf-to-jax output, a run's params/)
    prompt: tuple[str, ...] | list[str]  # one batch of prompts
    tokenizer: str | Path | None = None  # default: the one found with the parameters
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] | list[str] | None = None  # each continuation ends before the first of these
    mesh: str | None = None  # decode sharded over the devices, e.g. "data=4,tensor=2"
    adapters: str | Path | None = None  # a LoRA run's adapters/ over `model`
    dtype: str = "bfloat16"  # parameters and computation (logits and softmax in float32 either way)
    truncate: bool = False  # cut a prompt too long for the model as `eval` does, instead of refusing it


def complete(r: GenerateRequest) -> list[str]:
    """The continuation of each prompt, cut at the first stop sequence."""
    from mellama_jax.generate import truncate_at_stop

    backend = JaxBackend(r.model, r.tokenizer, r.mesh, r.adapters, r.dtype, len(r.prompt), r.truncate,
                         r.max_new_tokens)
    texts = backend.generate(list(r.prompt), r.max_new_tokens, r.temperature, r.top_p, r.seed)
    return [truncate_at_stop(text, r.stop or ()) for text in texts]


def continuation(decode, prompt_ids: list[int], new_ids) -> str:
    """The generated text as it reads after the prompt (SentencePiece drops a leading space when the new tokens
    are decoded alone, so decode the whole sequence and cut the decoded prompt off)."""
    new = [int(t) for t in new_ids if t != 0]
    whole, prompt = decode(list(prompt_ids) + new), decode(list(prompt_ids))
    return whole[len(prompt):] if whole.startswith(prompt) else decode(new)


class HFBackend:
    """transformers on a Hugging Face directory (e.g. `convert jax-to-hf` output), CPU or CUDA.

    tokenizer="sentencepiece" (default when the directory has tokenizer.model) encodes and decodes with
    SentencePiece, as training and Meta's reference do; "transformers" uses AutoTokenizer, whose LLaMA tokenizer
    in transformers 5 splits runs of spaces differently ("a  b": [259, 1609] where SentencePiece gives
    [29871, 491]), so on such prompts the two backends see different tokens.
    """

    def __init__(self, hf_dir: str | Path, tokenizer: str = "sentencepiece", dtype: str = "bfloat16"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mellama_jax.data.tokenizer import Tokenizer

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
        from mellama_jax.generate import left_pad

        encoded = fitted(self, self._encode(prompts), self.model.config.max_position_embeddings, max_new_tokens)
        ids, mask = left_pad(encoded, 0)  # LLaMA has no pad token; padded positions are masked
        ids, mask = (self.torch.tensor(a, dtype=self.torch.long, device=self.device) for a in (ids, mask))
        with self.torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=0)
        return [continuation(self._decode, p, row[ids.shape[1]:].tolist()) for p, row in zip(encoded, out)]


def few_shot_prefix(task: str, data: str | Path | None, k: int, templates: dict, seed: int = 0,
                    split: str | Path | None = None) -> str:
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

    task: str
    data: str | Path  # the dataset's original file or folder
    model: str | Path  # jax: a parameter folder; hf: a Hugging Face folder
    out: str | Path
    prompts: str | Path | None = None  # the authors' prompt_templates.json
    backend: str = "jax"
    split: str | Path | None = None  # PubMedQA's id -> label file
    limit: int | None = None  # the first N examples
    batch_size: int = 8
    max_new_tokens: int | None = None  # default: the harness's 256
    fewshot: int = 0
    fewshot_data: str | Path | None = None
    seed: int = 0  # which few-shot demonstrations are drawn
    mesh: str | None = None  # jax: decode sharded over the devices
    dtype: str = "bfloat16"  # both backends: parameters and computation
    bertscore_model: str | None = None
    hf_tokenizer: str = "sentencepiece"
    adapters: str | Path | None = None  # jax: a LoRA run's adapters/ over `model`
    tokenizer: str | Path | None = None  # jax: default, the one found with the parameters
    # the authors' chat wrapper around each whole prompt: "none" (their default) or "mellama" (Human:/Assistant:,
    # the format our chat-LoRA recipes tune in; docs/evaluation.md)
    model_prompt: str = "none"
    overwrite: bool = False  # replace an earlier eval output at `out`
    overlap: str | Path | None = None  # `prepare overlap`'s overlap.json: metrics on the clean subset too


def evaluate(r: EvalRequest) -> dict:
    inputs = [r.data, r.split, r.fewshot_data]
    wrap_prompt("", r.model_prompt)  # an unknown wrapper fails here, before the model loads
    check_destination(r.out, "eval", r.overwrite, inputs)  # before hours of decoding, not after
    dirty = overlapping_ids(r.overlap, r.task) if r.overlap else set()
    templates = load_templates(r.prompts)
    definition, examples, entry = load_task(r.task, r.data, templates, r.split)
    examples = examples[:r.limit] if r.limit else examples
    prefix = few_shot_prefix(r.task, r.fewshot_data, r.fewshot, templates, r.seed)
    max_new_tokens = r.max_new_tokens or HARNESS_MAX_NEW_TOKENS
    model = storage.fetch(r.model, context=3)  # from a bucket: into the local cache, with its run's files
    adapters = storage.fetch(r.adapters, context=3) if r.adapters else None
    runner = (JaxBackend(model, r.tokenizer, r.mesh, adapters, r.dtype, r.batch_size,
                         max_new_tokens=max_new_tokens) if r.backend == "jax"
              else HFBackend(model, r.hf_tokenizer, r.dtype))
    texts = [wrap_prompt(prefix + render(entry["prompt"], e.fields), r.model_prompt) for e in examples]
    outputs, times = _generate_all(runner, texts, r.batch_size, max_new_tokens, f"{r.task} ({r.backend})")
    rows = make_rows(definition, examples, outputs, entry.get("choices"))
    predictions, metrics = score_rows(definition, rows, r.bertscore_model)
    after_first = len(examples) - min(r.batch_size, len(examples))
    if runner.truncated:
        print(f"eval: {runner.truncated} of {len(texts)} prompts did not fit the model's positions with "
              f"{max_new_tokens} new tokens; each kept BOS and its last tokens, as the authors' harness did "
              "(summary.json: truncated_prompts)", file=sys.stderr)
    run = {"backend": r.backend, "model": str(r.model), "data": str(r.data), "fewshot": r.fewshot,
           "model_prompt": r.model_prompt, "max_new_tokens": max_new_tokens, "dtype": r.dtype,
           "truncated_prompts": runner.truncated}
    speed = {"examples_per_s": len(examples) / sum(times),
             # the first batch includes JAX's compilation
             "examples_per_s_after_first_batch": after_first / sum(times[1:]) if after_first else None}
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
        batch = order[start:start + batch_size]
        for i, text in zip(batch, runner.generate([texts[i] for i in batch], max_new_tokens)):
            outputs[i] = text
        times.append(time.perf_counter() - began)
    return outputs, times
