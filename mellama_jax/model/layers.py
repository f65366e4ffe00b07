"""Building blocks: projections, RMSNorm, embeddings, and logical activation constraints.

Every parameter is an `nnx.Param` whose `out_sharding` metadata holds *logical* axis names; the mapping to
mesh axes happens outside the model (mellama_jax/sharding.py), so model code never names a mesh axis.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx


def param(rngs: nnx.Rngs | None, init, shape: tuple[int, ...], dtype, axes: tuple) -> nnx.Param:
    if len(axes) != len(shape):
        raise ValueError(f"parameter of shape {shape} needs {len(shape)} logical axis names, got {axes}")
    value = init(rngs.params(), shape, dtype) if rngs is not None else init(None, shape, dtype)
    # eager_sharding=False: sharding is applied by the jitted init from the rule table, not here.
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def constrain(x: jax.Array, axes: tuple) -> jax.Array:
    """Sharding hint by logical names; a no-op unless the caller set a mesh and a rule table."""
    return nn.with_logical_constraint(x, axes)


class Dense(nnx.Module):
    """y = x @ kernel over the trailing `len(in_shape)` dims of x; inputs cast to `dtype`, fp32 accumulation."""

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], axes: tuple, *,
                 dtype, param_dtype, init_std: float, rngs: nnx.Rngs):
        self.kernel = param(rngs, nn.initializers.normal(init_std), tuple(in_shape) + tuple(out_shape),
                            param_dtype, axes)
        self.num_in = len(in_shape)
        self.dtype = dtype

    def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
        n = self.num_in
        dims = ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ()))
        y = jax.lax.dot_general(x.astype(self.dtype), self.kernel[...].astype(self.dtype), dims,
                                preferred_element_type=jnp.float32)
        return y.astype(out_dtype or self.dtype)


class RMSNorm(nnx.Module):
    """LLaMA's RMSNorm: statistics in fp32, as Hugging Face computes them."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.scale = param(None, nn.initializers.ones, (dim,), param_dtype, ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * self.scale[...].astype(self.dtype)


class Embed(nnx.Module):
    def __init__(self, vocab_size: int, dim: int, *, dtype, param_dtype, init_std: float, rngs: nnx.Rngs):
        self.embedding = param(rngs, nn.initializers.normal(init_std), (vocab_size, dim), param_dtype,
                               ("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        # Gather from a table whose hidden dim is whole (the FSDP all-gather every weight gets), so the
        # partitioner never has to reshard the gathered rows from "embed-sharded" to "batch-sharded".
        table = constrain(self.embedding[...], ("vocab", None))
        return jnp.take(table, ids, axis=0).astype(self.dtype)
