"""Greedy decoding by full recompute: one compiled step for any number of new tokens.

Each step reruns the whole (fixed-size) buffer through the model, so it is the reference that a KV-cache
decoder must reproduce; prompts are left-padded and positions come from the attention mask, as in Hugging
Face's `generate`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(prompts), width), dtype=np.int32)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    return ids, mask


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2, 3, 4))
def _greedy_step(graphdef, state, tokens, mask, done, t, eos_id, pad_id):
    model = nnx.merge(graphdef, state)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    hidden = model.hidden_states(tokens, positions, segment_ids=mask)
    last = jax.lax.dynamic_index_in_dim(hidden, t - 1, axis=1, keepdims=False)
    next_ids = jnp.argmax(model.lm_head(last, out_dtype=jnp.float32), axis=-1).astype(tokens.dtype)
    next_ids = jnp.where(done, pad_id, next_ids)
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, next_ids, t, axis=1)
    mask = jax.lax.dynamic_update_index_in_dim(mask, jnp.where(done, 0, 1).astype(mask.dtype), t, axis=1)
    return tokens, mask, done | (next_ids == eos_id)


def greedy_generate(model: nnx.Module, prompts: list[list[int]], max_new_tokens: int,
                    eos_id: int | None = None, pad_id: int = 0) -> np.ndarray:
    """New token ids (B, max_new_tokens); after an EOS a row continues with pad_id."""
    ids, mask = left_pad(prompts, pad_id)
    B, P = ids.shape
    tokens = jnp.asarray(np.pad(ids, ((0, 0), (0, max_new_tokens)), constant_values=pad_id))
    mask = jnp.asarray(np.pad(mask, ((0, 0), (0, max_new_tokens))))
    done = jnp.zeros((B,), bool)
    graphdef, state = nnx.split(model)
    eos = jnp.int32(-1 if eos_id is None else eos_id)
    for t in range(P, P + max_new_tokens):
        tokens, mask, done = _greedy_step(graphdef, state, tokens, mask, done, jnp.int32(t), eos, jnp.int32(pad_id))
    return np.asarray(tokens[:, P:])
