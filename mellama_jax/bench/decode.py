"""`bench decode`: tokens/s of our KV-cache decoding beside transformers' `generate` on the same weights,
the same prompts and the same machine, at several batch sizes (greedy, every row runs to the full length).
Best of `repeats` interleaved runs (and the median beside it)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from mellama_jax.bench.timing import torch_device
from mellama_jax.config import load_model_preset
from mellama_jax.convert.export import hf_config
from mellama_jax.convert.hf import load_hf_state_dict
from mellama_jax.generate import decoder, generate
from mellama_jax.options import POSITIVE, option, positive_list


@dataclasses.dataclass(frozen=True)
class DecodeBenchRequest:
    """One `bench decode` run: what `mellama-jax bench decode` parses, and what `bench_decode` takes."""

    model: str = option("bench-60m", "model preset (random weights, shared by both)")
    batches: tuple[int, ...] = option((1, 16, 64), "comma-separated batch sizes", type=positive_list)
    prompt_len: int = option(64, type=POSITIVE)
    new_tokens: int = option(64, type=POSITIVE)  # every row decodes exactly this many (no EOS)
    repeats: int = option(5, "interleaved runs of each side; the best and the median are reported", type=POSITIVE)
    dtype: str = option("bfloat16", "both sides: parameters and computation", choices=["bfloat16", "float32"])


def bench_decode(r: DecodeBenchRequest, *, seed: int = 0) -> dict:
    # here, not at the top: torch and transformers come with the optional interop extra
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dataclasses.replace(load_model_preset(r.model), param_dtype=r.dtype, dtype=r.dtype)
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(LlamaConfig(**hf_config(cfg, "float32"))).eval()  # initialised in float32, then cast
    ours = decoder(load_hf_state_dict(cfg, {k: v.numpy() for k, v in hf.state_dict().items()}), consume=True)
    hf = hf.to(torch_device(), getattr(torch, r.dtype))  # a lent GPU runs both sides on it
    rng = np.random.default_rng(seed)
    rows = [_row(r, ours, hf, rng.integers(3, cfg.vocab_size, (batch, r.prompt_len))) for batch in r.batches]
    return {
        "model": r.model,
        "dtype": r.dtype,
        "prompt_len": r.prompt_len,
        "new_tokens": r.new_tokens,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }


def _row(r: DecodeBenchRequest, ours, hf, prompts: np.ndarray) -> dict:
    """One batch of prompts decoded by both sides: tokens/s (best and median of interleaved runs) and agreement."""
    import torch  # the interop extra, as in bench_decode

    batch, new_tokens = len(prompts), r.new_tokens
    ids = torch.tensor(prompts, device=torch_device())

    def ours_run():
        return generate(ours, prompts.tolist(), new_tokens)

    def hf_run():
        with torch.no_grad():
            out = hf.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        return out[:, r.prompt_len :].cpu().numpy()  # waits for the GPU's work, as ours returns host tokens

    row = {"batch": batch}
    start = time.perf_counter()
    first = ours_run()  # compiles
    row["jax_compile_s"] = time.perf_counter() - start
    hf_tokens = hf_run()
    times = {"jax": [], "hf": []}
    for _ in range(r.repeats):  # interleaved, so that both see the same machine as its load comes and goes
        for name, run in (("jax", ours_run), ("hf", hf_run)):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    for name, seconds in times.items():
        row[f"{name}_tokens_per_s"] = batch * new_tokens / min(seconds)
        row[f"{name}_tokens_per_s_median"] = batch * new_tokens / float(np.median(seconds))
    row["ratio"] = row["jax_tokens_per_s"] / row["hf_tokens_per_s"]
    row["same_tokens"] = bool((first == hf_tokens).all())
    # bf16: the two round differently and part ways at a near-tie; the share of each row before that point
    differs = first != hf_tokens
    row["shared_prefix_fraction"] = float(np.mean(np.where(differs.any(1), differs.argmax(1), new_tokens)) / new_tokens)
    return row
