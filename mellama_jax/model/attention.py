"""Attention kernels: an XLA reference and `jax.nn.dot_product_attention` (cuDNN flash attention on GPUs).

Both take q of shape (B, T, H, D) and k, v of shape (B, S, K, D) with H a multiple of K (grouped-query
attention without materialising repeated keys) and a boolean mask (B, T, S): True where a query may attend.
"""

import jax
import jax.numpy as jnp


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


def xla_attention(q, k, v, mask):
    B, T, H, D = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, H // K, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (D ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, H, D).astype(q.dtype)


def dot_product_attention(q, k, v, mask):
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])


IMPLEMENTATIONS = {"xla": xla_attention, "dot_product": dot_product_attention}


def attend(q, k, v, mask, implementation: str = "xla"):
    return IMPLEMENTATIONS[implementation](q, k, v, mask)
