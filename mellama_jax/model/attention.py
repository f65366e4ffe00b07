"""Attention kernels: an XLA reference, `jax.nn.dot_product_attention`'s XLA path, and cuDNN flash attention.

All take q of shape (B, T, H, D) and k, v of shape (B, S, K, D) with H a multiple of K (grouped-query
attention without materialising repeated keys) and a boolean mask (B, T, S): True where a query may attend.

`causal=True` says the mask is causal with queries and keys at the same positions (training, scoring), which
lets cuDNN skip the masked half of the score matrix. Decoding against a KV cache passes False and runs the XLA
reference: it is memory-bound, and its one-token queries are not what the flash kernels are built for.
"""

import functools

import jax
import jax.numpy as jnp

from mellama_jax.model import layers


def make_mask(q_segment_ids: jnp.ndarray, kv_segment_ids: jnp.ndarray,
              q_index: jnp.ndarray | None = None, kv_index: jnp.ndarray | None = None) -> jnp.ndarray:
    """Causal mask restricted to equal segment ids: packed documents never see each other.

    Segment id 0 marks padding; padding attends only to padding, so no row of the mask is empty
    (and no softmax produces NaN), while real tokens never attend to padding.
    """
    T, S = q_segment_ids.shape[-1], kv_segment_ids.shape[-1]
    q_index = jnp.arange(T) if q_index is None else q_index
    kv_index = jnp.arange(S) if kv_index is None else kv_index
    causal = q_index[..., :, None] >= kv_index[..., None, :]
    same_segment = q_segment_ids[..., :, None] == kv_segment_ids[..., None, :]
    return causal & same_segment


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_f32(spec, a, b):
    """einsum accumulated (and returned) in fp32, whose gradients are einsums on the operands' own dtype: the
    fp32 cotangent is cast down first, or XLA would promote the bf16 operand and run the backward in fp32."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _einsum_f32_fwd(spec, a, b):
    return _einsum_f32(spec, a, b), (a, b)


def _einsum_f32_bwd(spec, residuals, ct):
    a, b = residuals
    dtype = layers.gradient_operand_dtype(jnp.result_type(a, b))
    _, vjp = jax.vjp(functools.partial(jnp.einsum, spec), a.astype(dtype), b.astype(dtype))
    da, db = vjp(ct.astype(dtype))
    return da.astype(a.dtype), db.astype(b.dtype)


_einsum_f32.defvjp(_einsum_f32_fwd, _einsum_f32_bwd)


def xla_attention(q, k, v, mask, causal=False):
    B, T, H, D = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, H // K, D)
    scores = _einsum_f32("btkgd,bskd->bkgts", q, k)
    scores = scores * (D ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = _einsum_f32("bkgts,bskd->btkgd", probs, v)
    return out.reshape(B, T, H, D).astype(q.dtype)


def dot_product_attention(q, k, v, mask, causal=False):
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])


def cudnn_attention(q, k, v, mask, causal=True):
    """cuDNN's fused flash attention (GPU, bf16/fp16). The causal structure is the kernel's own; the mask also
    rides along as an additive bias (B, 1, T, S), which keeps packed documents apart at the price of reading it
    (and of a bias gradient cuDNN always computes)."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], is_causal=True, implementation="cudnn")


def cudnn_causal_attention(q, k, v, mask, causal=True):
    """cuDNN flash attention with the causal mask alone: no bias, so the fastest, but packed documents see each
    other (as in transformers' Trainer on concatenated text): for unpacked data, or where that is acceptable."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


IMPLEMENTATIONS = {"xla": xla_attention, "dot_product": dot_product_attention, "cudnn": cudnn_attention,
                   "cudnn_causal": cudnn_causal_attention}


def resolve(implementation: str) -> str:
    """'auto': cuDNN flash attention on GPUs (segment-aware), the XLA reference elsewhere."""
    if implementation == "auto":
        return "cudnn" if jax.default_backend() == "gpu" else "xla"
    return implementation


def attend(q, k, v, mask, implementation: str = "xla", causal: bool = False):
    name = resolve(implementation)
    if name.startswith("cudnn") and not causal:
        name = "xla"
    return IMPLEMENTATIONS[name](q, k, v, mask, causal)
