"""Attention kernels: an XLA reference, `jax.nn.dot_product_attention`'s XLA path, and cuDNN flash attention.

All take q of shape (B, T, H, D) and k, v of shape (B, S, K, D) with H a multiple of K (grouped-query
attention without materialising repeated keys) and a boolean mask (B, T, S): True where a query may attend.

`causal=True` says the mask is causal with queries and keys at the same positions (training, scoring), which
lets cuDNN skip the masked half of the score matrix. Decoding against a KV cache passes False and runs the XLA
reference: it is memory-bound, and its one-token queries are not what the flash kernels are built for.
"""


import contextlib

import jax
import jax.numpy as jnp

from mellama_jax.model import layers

try:  # JAX's cuDNN attention module: private, so only a hook is borrowed from it, and only if it is there
    from jax._src.cudnn import fused_attention_stablehlo as _cudnn_module
except ImportError:  # pragma: no cover - a JAX without it
    _cudnn_module = None


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


def _softmax_attention(q, k, v, mask):
    """Head-major core: q (B, K, G, T, D) pre-scaled, k/v (B, K, S, D), mask (B, 1, 1, T, S) -> out (B, K, G, T, D)
    and the probabilities (B, K, G, T, S). Scores and softmax in fp32; products on the operands' dtype."""
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype), probs


@jax.custom_vjp
def _attention_core(q, k, v, mask):
    return _softmax_attention(q, k, v, mask)[0]


def _attention_core_fwd(q, k, v, mask):
    out, probs = _softmax_attention(q, k, v, mask)
    return out, (q, k, v, mask, out, probs)


def _attention_core_bwd(residuals, d_out):
    """Softmax backward as flash attention writes it: dS = P * (dP - rowsum(dO * O)), a (T, D) reduction in place
    of a (T, S) one; every product a plain batched matmul (fused into one with the softmax backward, XLA's CPU
    matmuls ran 3x slower), on the operands' dtype with fp32 accumulation."""
    q, k, v, mask, out, probs = residuals
    dtype = layers.gradient_operand_dtype(q.dtype)
    q, k, v, d_out_c = (x.astype(dtype) for x in (q, k, v, d_out))
    f32 = jnp.float32
    d_probs = jnp.einsum("bkgtd,bksd->bkgts", d_out_c, v, preferred_element_type=f32)
    row = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
    d_scores = (probs * (d_probs - row)).astype(dtype)
    dq = jnp.einsum("bkgts,bksd->bkgtd", d_scores, k, preferred_element_type=f32)
    dk = jnp.einsum("bkgts,bkgtd->bksd", d_scores, q, preferred_element_type=f32)
    dv = jnp.einsum("bkgts,bkgtd->bksd", probs.astype(dtype), d_out_c, preferred_element_type=f32)
    return dq.astype(out.dtype), dk.astype(out.dtype), dv.astype(out.dtype), None


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


def xla_attention(q, k, v, mask, causal=False):
    B, T, H, D = q.shape
    K = k.shape[2]
    qh = (q * jnp.asarray(D ** -0.5, q.dtype)).reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    out = _attention_core(qh, kh, vh, mask[:, None, None])
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)


def dot_product_attention(q, k, v, mask, causal=False):
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])


@contextlib.contextmanager
def _without_bias_gradient():
    """cuDNN's attention computes the gradient of its bias whenever JAX's `should_export_dbias` says so, and
    JAX says so for every bias. Our bias is the document mask, a constant: its gradient, a (B, 1, T, S) sum over
    heads, is pure waste and doubled the backward kernel's time on an H100 (docs/benchmarks.md). The hook is read
    once, while the forward is traced; the backward gets the answer as a static argument."""
    hook = getattr(_cudnn_module, "should_export_dbias", None)
    if hook is None:
        yield
        return
    _cudnn_module.should_export_dbias = lambda *args: False
    try:
        yield
    finally:
        _cudnn_module.should_export_dbias = hook


def cudnn_attention(q, k, v, mask, causal=True):
    """cuDNN's fused flash attention (GPU, bf16/fp16). The causal structure is the kernel's own; the mask also
    rides along as an additive bias (B, 1, T, S), which keeps packed documents apart at the price of reading it.
    The mask is not differentiated, so cuDNN is told not to compute the bias gradient."""
    with _without_bias_gradient():
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
