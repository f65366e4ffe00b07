"""Decoding: `generate` (KV cache, one compiled loop, optionally sharded over a mesh like training) and
`greedy_generate` (full recompute each step: the reference the cached decoder must reproduce).

Prompts are left-padded and positions come from the attention mask, as in Hugging Face's `generate`.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx
from jax.sharding import Mesh

from mellama_jax.model.layers import constrain
from mellama_jax.model.llama import init_cache
from mellama_jax.sharding import batch_sharding, state_shardings


def bucket(width: int) -> int:
    """The padded prompt width: a multiple of 64 up to 256, then the next of 256, 384, 512, 768, 1024, ...
    (steps of 1.5x and 2x), so that a whole evaluation compiles a handful of shapes and pads at most ~1.5x."""
    if width <= 256:
        return max(64, -(-width // 64) * 64)
    size = 256
    while size < width:
        size = size * 3 // 2 if (size & (size - 1)) == 0 else size * 4 // 3
    return size


def left_pad(
    prompts: list[list[int]], pad_id: int = 0, multiple: int = 1, buckets: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids and mask; the width is rounded up to `multiple`, or to a `bucket` size, so that
    varying prompt lengths share a few compiled shapes."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    width = bucket(width) if buckets else -(-width // multiple) * multiple
    ids = np.full((len(prompts), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(prompts), width), dtype=np.int32)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
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


def greedy_generate(
    model: nnx.Module, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None = None, pad_id: int = 0
) -> np.ndarray:
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


# ------------------------------------------------------------------------------------------ KV-cache decoding


def _pick(logits, key, temperature, top_p):
    """Greedy when temperature == 0; else temperature and nucleus (top-p) sampling."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        keep_sorted = jnp.cumsum(probs, axis=-1) - probs < top_p  # always keeps the most likely token
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1)


class Decoder(NamedTuple):
    """A model laid out for decoding: each layer's weights sliced out of the stacked parameters once (copies, as
    MaxText's inference keeps them with scan_layers=False), beside the rest of the model. Made once per loaded
    model (`decoder`); slicing inside the compiled decode copied every layer's weights again on every `generate`
    call, `eval` makes one per batch, and held them twice while it ran (docs/benchmarks.md)."""

    graphdef: nnx.GraphDef  # the model without its stacked layers
    state: nnx.State
    layer_graphdef: nnx.GraphDef
    layers: tuple  # one nnx.State per layer


def decoder(model: nnx.Module, consume: bool = False) -> Decoder:
    """`model` laid out for decoding. The stacked layers stay in `model` (the layer weights are held twice while
    both live) unless `consume`: then each stacked weight is freed as soon as it is sliced and `model` is spent,
    for loaders that drop it anyway (see `Llama.unstacked_layers`)."""
    layers = model.unstacked_layers(consume)
    shell = nnx.merge(*nnx.split(model))  # a second module graph over the same arrays
    del shell.layers
    graphdef, state = nnx.split(shell)
    return Decoder(graphdef, state, nnx.split(layers[0])[0], tuple(nnx.split(layer)[1] for layer in layers))


@functools.partial(jax.jit, static_argnums=(0, 2, 6, 9, 10, 11))
def _decode(
    graphdef, state, layer_graphdef, layer_states, ids, mask, max_new_tokens, eos_id, key, temperature, top_p, rules
):
    with nn.logical_axis_rules(rules or ()):
        model = nnx.merge(graphdef, state)
        layers = [nnx.merge(layer_graphdef, s) for s in layer_states]
        B, P = ids.shape
        cache = init_cache(model.cfg, B, P + max_new_tokens)
        # the cache follows the batch over data/fsdp and the KV heads over tensor, as training's activations
        kv_axes = ("activation_batch", "activation_kv_heads", "activation_length", "head_dim")
        cache.update(k=[constrain(k, kv_axes) for k in cache["k"]], v=[constrain(v, kv_axes) for v in cache["v"]])
        positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
        hidden, cache = model.decode_hidden_states(ids, cache, layers, positions, mask)  # prefill
        logits = model.lm_head(hidden[:, -1], out_dtype=jnp.float32)
        out = jnp.zeros((B, max_new_tokens), ids.dtype)
        next_pos = positions[:, -1] + 1
        done = jnp.zeros((B,), bool)

        def cond(carry):
            t, _, _, _, _, done = carry
            return (t < max_new_tokens) & ~jnp.all(done)

        def body(carry):
            t, logits, cache, out, next_pos, done = carry
            token = _pick(logits, jax.random.fold_in(key, t), temperature, top_p).astype(ids.dtype)
            token = jnp.where(done, 0, token)
            out = out.at[:, t].set(token)
            done = done | (token == eos_id)
            hidden, cache = model.decode_hidden_states(
                token[:, None], cache, layers, next_pos[:, None], jnp.ones((B, 1), mask.dtype)
            )
            logits = model.lm_head(hidden[:, 0], out_dtype=jnp.float32)
            return t + 1, logits, cache, out, next_pos + 1, done

        _, _, _, out, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), logits, cache, out, next_pos, done))
        return out


def _hashable(rules):
    """The rule table as nested tuples (YAML gives lists), so that it can be a static argument."""
    return tuple((name, tuple(v) if isinstance(v, list) else v) for name, v in (rules or ()))


def shard_for_decoding(model: nnx.Module, mesh: Mesh, rules) -> nnx.Module:
    """The model with its parameters laid out on `mesh` by the training rule table."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh, rules)))


def generate(
    model: nnx.Module | Decoder,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    mesh: Mesh | None = None,
    rules=None,
) -> np.ndarray:
    """New token ids (B, max_new_tokens) with a preallocated KV cache: one prefill, then one token per step
    inside a single compiled loop (no recompilation per step). After EOS a row is padded with 0.

    With a mesh (and the config's rule table), the batch is split over the batch axes (padded with copies of
    the last prompt to a multiple of their size), the cache follows it, and the parameters should already be
    laid out by `shard_for_decoding`: decoding is sharded as training is. Pass a `decoder(model)` when calling
    more than once (it slices the layers' weights once; a model is sliced again on each call).
    """
    ids, mask = left_pad(prompts, 0, buckets=True)
    n = len(prompts)
    parts = model if isinstance(model, Decoder) else decoder(model)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    if mesh is not None:
        sh = batch_sharding(mesh, rules)
        ways = mesh.size // sh.shard_shape((mesh.size, 1))[0]
        extra = -n % ways
        ids = jnp.concatenate([ids, jnp.repeat(ids[-1:], extra, 0)]) if extra else ids
        mask = jnp.concatenate([mask, jnp.repeat(mask[-1:], extra, 0)]) if extra else mask
        ids, mask = jax.device_put(ids, sh), jax.device_put(mask, sh)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        out = _decode(
            *parts,
            ids,
            mask,
            max_new_tokens,
            jnp.int32(-1 if eos_id is None else eos_id),
            jax.random.key(seed),
            float(temperature),
            float(top_p),
            _hashable(rules) if mesh is not None else None,
        )
    return np.asarray(out)[:n]


def truncate_at_stop(text: str, stop: list[str] | tuple[str, ...]) -> str:
    """The text before the first stop sequence (stop sequences are matched on decoded text)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]
