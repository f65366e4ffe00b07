"""Preset sizes, logical axis names, scanned layers and remat policies."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM

from mellama_jax.config import REMAT_POLICIES, load_model_preset
from mellama_jax.model import Llama, count_params, init_abstract

PUBLISHED = {"llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320, "llama2-70b": 68_976_648_192}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_parameter_counts(preset):
    cfg = load_model_preset(preset)
    ours = count_params(init_abstract(cfg))
    assert ours == PUBLISHED[preset]
    # Independent check: transformers' own model of the same shape, on the meta device (no memory).
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_cfg)
    assert sum(p.numel() for p in hf.parameters()) == ours


def test_every_parameter_has_logical_axes():
    state = nnx.state(init_abstract(load_model_preset("tiny-gqa")), nnx.Param)
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(var.shape), path
        if path[0] == "layers":
            assert axes[0] == "layers"
    flat = dict(nnx.to_flat_state(state))
    assert flat[("layers", "attn", "wk", "kernel")].get_metadata()["out_sharding"] == (
        "layers",
        "embed",
        "kv_heads",
        "head_dim",
    )
    assert flat[("lm_head", "kernel")].get_metadata()["out_sharding"] == ("embed", "vocab")


def _hlo_size(num_layers: int, scan_layers: bool = True) -> int:
    cfg = dataclasses.replace(load_model_preset("tiny"), num_layers=num_layers, scan_layers=scan_layers)
    model = init_abstract(cfg)
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return len(fn.lower(state, jax.ShapeDtypeStruct((1, 8), jnp.int32)).as_text())


def test_layers_are_scanned_not_unrolled():
    # A scanned stack lowers to one loop body: 40 layers produce the same program size as 1.
    one, forty = _hlo_size(1), _hlo_size(40)
    assert forty < 1.05 * one


@pytest.mark.parametrize("remat", ["none", "full"])
def test_unrolled_layers_equal_the_scan(remat, rng):
    """model.scan_layers=false runs the layers one after another on their slices of the same stacked weights:
    the program grows with depth, and loss and gradients equal the scanned model's."""
    assert _hlo_size(4, scan_layers=False) > 2 * _hlo_size(1, scan_layers=False)
    base = dataclasses.replace(load_model_preset("tiny-gqa"), remat=remat)
    ids = jnp.asarray(rng.integers(3, base.vocab_size, (2, 12)))

    def loss_and_grads(cfg):
        return nnx.value_and_grad(lambda m: jnp.mean(m(ids) ** 2))(Llama(cfg, rngs=nnx.Rngs(0)))

    ref_loss, ref = loss_and_grads(base)
    loss, got = loss_and_grads(dataclasses.replace(base, scan_layers=False))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_remat_policies_keep_gradients(policy, rng):
    base = load_model_preset("tiny")
    ids = jnp.asarray(rng.integers(3, base.vocab_size, (2, 12)))

    def grads(cfg):
        model = Llama(cfg, rngs=nnx.Rngs(0))
        return nnx.grad(lambda m: m(ids).mean())(model)

    ref = jax.tree.leaves(grads(base))
    got = jax.tree.leaves(grads(dataclasses.replace(base, remat=policy)))
    for a, b in zip(ref, got):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def _plain_rms_norm(x, scale, eps, dtype):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return y.astype(dtype) * scale.astype(dtype)


def _plain_swiglu(gate, up):
    g = gate.astype(jnp.float32)
    return (g * jax.nn.sigmoid(g) * up.astype(jnp.float32)).astype(gate.dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_norm_and_swiglu_backward_match_autodiff(dtype, rng):
    """The hand-written backwards of RMSNorm and SwiGLU against autodiff of the same expressions, in fp32 (equal
    to rounding) and with bf16 activations and fp32 parameters (equal to bf16 rounding); the norm's input has
    rows of very different scales, where a wrong statistic shows."""
    from mellama_jax.model.layers import rms_norm, swiglu

    dt = jnp.dtype(dtype)
    tol = 2e-5 if dtype == "float32" else 2e-2
    x = jnp.asarray(rng.normal(size=(2, 6, 32)) * rng.uniform(0.01, 30, (2, 6, 1)), dt)
    scale = jnp.asarray(rng.normal(1.0, 0.3, 32), jnp.float32)
    dy = jnp.asarray(rng.normal(size=x.shape), dt)

    def vjp(f, *args):
        out, pull = jax.vjp(f, *args)
        return [out, *pull(dy.astype(out.dtype).reshape(out.shape))]

    got = vjp(lambda x, s: rms_norm(x, s, 1e-5, dt), x, scale)
    ref = vjp(lambda x, s: _plain_rms_norm(x, s, 1e-5, dt), x, scale)
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) <= tol * np.linalg.norm(b)
    assert got[2].dtype == jnp.float32  # the fp32 master scale gets an fp32 gradient

    gate, up = (jnp.asarray(rng.normal(0, 3, size=(12, 40)), dt) for _ in range(2))
    dy = jnp.asarray(rng.normal(size=(12, 40)), dt)
    for a, b in zip(vjp(swiglu, gate, up), vjp(_plain_swiglu, gate, up)):
        assert a.dtype == b.dtype
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) <= tol * np.linalg.norm(b)


def _lora_and_base(cfg, lora):
    """A LoRA model and a plain model holding the very same base weights."""
    with_lora = Llama(cfg, rngs=nnx.Rngs(0), lora=lora)
    _, adapters, base_state = nnx.split(with_lora, nnx.LoRAParam, ...)
    plain = Llama(cfg, rngs=nnx.Rngs(1))
    nnx.update(plain, base_state)
    return with_lora, adapters, plain


def test_fresh_lora_model_equals_its_base_exactly(rng):
    """A fresh adapter must not change the model (PEFT's rule: B starts at zero, so x A B = 0 whatever A is):
    a LoRA model's logits before any training equal its base model's bit for bit, with dropout on as well."""
    from mellama_jax.config import LORA_TARGETS, LoraConfig

    cfg = load_model_preset("tiny-gqa")
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=LORA_TARGETS)
    with_lora, adapters, plain = _lora_and_base(cfg, lora)
    assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(adapters))  # A is random, not zero
    ids = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, 12)))
    base = np.asarray(plain(ids))
    np.testing.assert_array_equal(np.asarray(with_lora(ids)), base)
    np.testing.assert_array_equal(np.asarray(with_lora(ids, dropout_rng=jax.random.key(3))), base)


def test_lora_adds_alpha_over_rank_times_a_b(rng):
    """With non-zero B, the LoRA model equals its base with every targeted kernel replaced by W + (alpha/r) A B,
    merged here by hand in float64: alpha 8 and rank 4 give the factor 2 (PEFT's scaling, not alpha alone)."""
    from mellama_jax.config import LoraConfig

    cfg = load_model_preset("tiny-gqa")
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("wq", "wv", "w_down"))
    with_lora, adapters, plain = _lora_and_base(cfg, lora)
    flat = dict(nnx.to_flat_state(adapters))
    for path, var in flat.items():
        if path[-1] == "lora_b":
            var.set_value(jnp.asarray(rng.normal(0, 0.05, var.shape), var.dtype))
    nnx.update(with_lora, nnx.from_flat_state(flat))
    merged = dict(nnx.to_flat_state(nnx.state(plain, nnx.Param)))
    for path, var in flat.items():
        if path[-1] != "lora_a":
            continue
        kernel = np.asarray(merged[path[:-1] + ("kernel",)].get_value(), np.float64)  # (layers, in..., out...)
        a = np.asarray(var.get_value(), np.float64)  # (layers, in..., r)
        b = np.asarray(flat[path[:-1] + ("lora_b",)].get_value(), np.float64)  # (layers, r, out...)
        n_layers, r = a.shape[0], a.shape[-1]
        delta = np.einsum("lir,lro->lio", a.reshape(n_layers, -1, r), b.reshape(n_layers, r, -1))
        merged[path[:-1] + ("kernel",)].set_value(jnp.asarray(kernel + 2.0 * delta.reshape(kernel.shape), jnp.float32))
    nnx.update(plain, nnx.from_flat_state(merged))
    ids = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, 12)))
    got, ref = np.asarray(with_lora(ids)), np.asarray(plain(ids))
    assert np.abs(ref - np.asarray(_lora_and_base(cfg, lora)[2](ids))).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0)


def test_lora_backward_matches_autodiff_of_its_formula(rng):
    """The adapter's own backward against jax.grad of scale * (x @ a) @ b written plainly in fp32, with both
    factors non-zero and a scale (alpha / rank) other than 1, so that each gradient's factor of scale shows."""
    from mellama_jax.model.layers import lora_delta

    x, a, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((6, 8), (8, 2), (2, 5)))
    weights = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    scale = 2.5

    def loss(fn):
        return lambda x, a, b: jnp.sum(weights * fn(x, a, b))

    ours = jax.grad(loss(lambda x, a, b: lora_delta(x, a, b, scale, jnp.float32)), argnums=(0, 1, 2))(x, a, b)
    ref = jax.grad(loss(lambda x, a, b: scale * (x @ a) @ b), argnums=(0, 1, 2))(x, a, b)
    for got, want in zip(ours, ref):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
