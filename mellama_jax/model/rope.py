"""Rotary position embeddings in Hugging Face's rotate-half layout.

HF's LLaMA checkpoints store q/k projections permuted so that the two rotated halves of each head are
the first and second half of the head dimension (not interleaved pairs as in Meta's original code).
Using the same layout here lets converted weights be copied without any permutation.
"""

import jax.numpy as jnp


def cos_sin(positions: jnp.ndarray, head_dim: int, theta: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin of shape positions.shape + (head_dim,), in float32."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rotate(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate x (..., head_dim) by cos/sin that broadcast against it; computed in fp32, returned in x's dtype."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def apply(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate x of shape (..., T, heads, head_dim) by cos/sin of shape (..., T, head_dim)."""
    return rotate(x, cos[..., None, :], sin[..., None, :])
