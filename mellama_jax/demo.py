"""The demo: a small end-to-end run on the embedded medical-text sample, needing no downloads."""

from __future__ import annotations

import dataclasses
import json
import time
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mellama_jax.config import load_model_preset
from mellama_jax.data.tokenizer import Tokenizer
from mellama_jax.generate import greedy_generate
from mellama_jax.model import Llama, count_params

SOURCES = ("biomedical", "clinical", "general")


def sample_texts() -> dict[str, list[str]]:
    root = resources.files("mellama_jax") / "demo_data"
    return {name: [json.loads(line)["text"] for line in (root / f"{name}.jsonl").read_text().splitlines()
                   if line.strip()] for name in SOURCES}


def run_demo(out: str | Path) -> None:
    out = Path(out)
    texts = sample_texts()
    tokenizer = Tokenizer.train([t for lines in texts.values() for t in lines], vocab_size=512)
    tokenizer.save(out)
    cfg = dataclasses.replace(load_model_preset("tiny"), vocab_size=tokenizer.vocab_size)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; model {cfg.name}: "
          f"{count_params(model):,} parameters; tokenizer: {tokenizer.vocab_size} pieces -> {out}/tokenizer.model")

    docs = [tokenizer.encode(t, bos=True, eos=True) for t in texts["biomedical"][:4]]
    width = max(map(len, docs))
    ids = np.zeros((len(docs), width), np.int32)
    seg = np.zeros_like(ids)
    for i, d in enumerate(docs):
        ids[i, :len(d)], seg[i, :len(d)] = d, 1
    logits = nnx.jit(lambda m, x, s: m(x, segment_ids=s))(model, jnp.asarray(ids), jnp.asarray(seg))
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(logp, jnp.asarray(ids[:, 1:, None]), -1)[..., 0]
    weight = jnp.asarray(seg[:, 1:] * seg[:, :-1])
    loss = float((nll * weight).sum() / weight.sum())
    print(f"forward: logits {tuple(logits.shape)}, next-token loss {loss:.3f} "
          f"(untrained: ln(vocab) = {np.log(cfg.vocab_size):.3f})")

    prompt = "Metformin lowers"
    start = time.perf_counter()
    new = greedy_generate(model, [tokenizer.encode(prompt, bos=True)], max_new_tokens=12, eos_id=tokenizer.eos_id)
    print(f"greedy generation ({time.perf_counter() - start:.2f}s, untrained weights): "
          f"{prompt!r} -> {tokenizer.decode(new[0])!r}")
