"""Building blocks: projections, RMSNorm, embeddings, and logical activation constraints.

Every parameter is an `nnx.Param` whose `out_sharding` metadata holds *logical* axis names; the mapping to
mesh axes happens outside the model (mellama_jax/sharding.py), so model code never names a mesh axis.
"""

import math

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
    """y = x @ kernel over the trailing `len(in_shape)` dims of x; inputs cast to `dtype`, fp32 accumulation.

    With `lora_rank > 0` it also holds LoRA factors (nnx.LoRAParam, so a filter can train only them):
    lora_a (in..., rank) and lora_b (rank, out...), adding `lora_scale * dropout(x) @ lora_a @ lora_b`.
    lora_b starts at zero, so a fresh adapter leaves the output unchanged.
    """

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], axes: tuple, *,
                 dtype, param_dtype, init_std: float, rngs: nnx.Rngs, lora_rank: int = 0,
                 lora_scale: float = 1.0, lora_dropout: float = 0.0, lora_id: int = 0):
        self.kernel = param(rngs, nn.initializers.normal(init_std), tuple(in_shape) + tuple(out_shape),
                            param_dtype, axes)
        self.num_in = len(in_shape)
        self.dtype = dtype
        self.lora_scale, self.lora_dropout, self.lora_id = lora_scale, lora_dropout, lora_id
        if lora_rank:
            n_in = len(in_shape)
            # PEFT's init: A ~ kaiming-uniform (a = sqrt(5)) over fan-in, B = 0.
            bound = 1.0 / math.sqrt(math.prod(in_shape))
            self.lora_a = nnx.LoRAParam(
                jax.random.uniform(rngs.params(), tuple(in_shape) + (lora_rank,), param_dtype, -bound, bound),
                out_sharding=tuple(axes[:n_in]) + (None,), eager_sharding=False)
            self.lora_b = nnx.LoRAParam(jnp.zeros((lora_rank,) + tuple(out_shape), param_dtype),
                                        out_sharding=(None,) + tuple(axes[n_in:]), eager_sharding=False)
        else:
            self.lora_a = self.lora_b = None

    def _contract(self, x, w, n):
        dims = ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ()))
        return jax.lax.dot_general(x.astype(self.dtype), w.astype(self.dtype), dims,
                                   preferred_element_type=jnp.float32)

    def __call__(self, x: jax.Array, out_dtype=None, dropout_rng: jax.Array | None = None) -> jax.Array:
        y = self._contract(x, self.kernel[...], self.num_in)
        if self.lora_a is not None:
            xa = x
            if dropout_rng is not None and self.lora_dropout > 0:
                keep = jax.random.bernoulli(jax.random.fold_in(dropout_rng, self.lora_id), 1 - self.lora_dropout,
                                            x.shape)
                xa = jnp.where(keep, x / (1 - self.lora_dropout), 0).astype(x.dtype)
            low = self._contract(xa, self.lora_a[...], self.num_in)
            y = y + self.lora_scale * self._contract(low, self.lora_b[...], 1)
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
