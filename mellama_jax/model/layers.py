"""Building blocks: projections, RMSNorm, embeddings, and logical activation constraints.

Every parameter is an `nnx.Param` whose `out_sharding` metadata holds *logical* axis names; the mapping to
mesh axes happens outside the model (mellama_jax/sharding.py), so model code never names a mesh axis.
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from jax.ad_checkpoint import checkpoint_name


def param(rngs: nnx.Rngs | None, init, shape: tuple[int, ...], dtype, axes: tuple) -> nnx.Param:
    if len(axes) != len(shape):
        raise ValueError(f"parameter of shape {shape} needs {len(shape)} logical axis names, got {axes}")
    value = init(rngs.params(), shape, dtype) if rngs is not None else init(None, shape, dtype)
    # eager_sharding=False: sharding is applied by the jitted init from the rule table, not here.
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def constrain(x: jax.Array, axes: tuple) -> jax.Array:
    """Sharding hint by logical names; a no-op unless the caller set a mesh and a rule table."""
    return nn.with_logical_constraint(x, axes)


def _contracting(x_ndim: int, n: int) -> tuple:
    """dot_general dims contracting x's trailing n dims with w's leading n dims."""
    return ((tuple(range(x_ndim - n, x_ndim)), tuple(range(n))), ((), ()))


def target_platform() -> str:
    """The platform being compiled for, the one answer to "which backend" for model code: the devices of the mesh
    in context (`plan --target tpu` compiles for TPU devices from a CPU host), else JAX's default backend."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


def gradient_operand_dtype(dtype):
    """The operand dtype of gradient matmuls. XLA's CPU backend cannot run some bf16 x bf16 -> f32 dots (those with
    transposed operands fall to its generic dot, which lacks the type pair); there the gradients multiply fp32
    copies of the same bf16 values (exact, so the result differs only in summation order)."""
    return jnp.dtype(jnp.float32) if target_platform() == "cpu" else jnp.dtype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def matmul(x, w, n: int, dtype, out_dtype):
    """x (..., in...) @ w (in..., out...) over n `in` dims: operands in `dtype`, fp32 accumulation, out_dtype out.

    The gradients are matmuls on `dtype` operands as well, accumulated in fp32, with w's gradient returned in
    w's own dtype (fp32 master weights get an fp32 gradient, never rounded to bf16). Left to autodiff, the
    transpose of a bf16 dot with an fp32 result multiplies the fp32 cotangent by the bf16 operand, which XLA
    promotes to an fp32 matmul: on an H100 the whole backward pass ran as TF32 (docs/benchmarks.md).
    """
    one_row = _one_row_on_cpu(x, n, dtype)
    if one_row:
        x = jnp.concatenate([x, x])
    y = jax.lax.dot_general(
        x.astype(dtype), w.astype(dtype), _contracting(x.ndim, n), preferred_element_type=jnp.float32
    ).astype(out_dtype)
    return y[:1] if one_row else y


def _one_row_on_cpu(x, n: int, dtype) -> bool:
    """A one-row bf16 product on XLA's CPU backend, which rewrites it as an fp32 multiply-reduce over a converted
    copy of the whole weight (so decoding one sequence would hold an fp32 copy of the model); two rows run as a bf16
    matmul."""
    rows = math.prod(x.shape[: x.ndim - n])
    return rows == 1 and x.ndim > n and jnp.dtype(dtype) == jnp.bfloat16 and target_platform() == "cpu"


def _matmul_fwd(x, w, n, dtype, out_dtype):
    return matmul(x, w, n, dtype, out_dtype), (x, w)


def _matmul_bwd(n, dtype, out_dtype, residuals, ct):
    x, w = residuals
    batch, out = x.ndim - n, w.ndim - n
    dtype = gradient_operand_dtype(dtype)
    ct, xc, wc = ct.astype(dtype), x.astype(dtype), w.astype(dtype)
    # dx[b, i] = sum_o ct[b, o] w[i, o];  dw[i, o] = sum_b x[b, i] ct[b, o]
    dx = jax.lax.dot_general(
        ct,
        wc,
        ((tuple(range(batch, batch + out)), tuple(range(n, n + out))), ((), ())),
        preferred_element_type=jnp.float32,
    )
    dw = jax.lax.dot_general(
        xc, ct, ((tuple(range(batch)), tuple(range(batch))), ((), ())), preferred_element_type=jnp.float32
    )
    return dx.astype(x.dtype), dw.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _dot(a, b, contract: tuple[int, int], dtype):
    return jax.lax.dot_general(
        a.astype(dtype),
        b.astype(dtype),
        (((contract[0],), (contract[1],)), ((), ())),
        preferred_element_type=jnp.float32,
    )


def _flat(x, a, b):
    """x (..., in...), a (in..., rank), b (rank, out...) as (rows, in), (in, rank), (rank, out): free reshapes."""
    return x.reshape(-1, math.prod(a.shape[:-1])), a.reshape(-1, a.shape[-1]), b.reshape(b.shape[0], -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def lora_delta(x, a, b, scale: float, dtype):
    """scale * (x @ a) @ b for x (..., in...), a (in..., rank), b (rank, out...): operands in `dtype`, fp32 out.

    Its own backward, because the adapter's matmuls are too narrow to hide anything: there the scale multiplies
    the rank-wide products (not the (rows, out) cotangent), and a's gradient is computed as (rank, in) and
    transposed; XLA's CPU dot ran the (in, rank) = x^T @ d(x a) form several times slower (it transposed x for a
    product a few columns wide; docs/benchmarks.md). It keeps x as the base projection's backward does (the
    same array, not a reshaped copy that a scan would stack a second time).
    """
    return _lora_delta_fwd(x, a, b, scale, dtype)[0]


def _lora_delta_fwd(x, a, b, scale, dtype):
    x2, a2, b2 = _flat(x, a, b)
    xa = _dot(x2, a2, (1, 0), dtype)
    y = scale * _dot(xa, b2, (1, 0), dtype)
    return y.reshape(x.shape[: x.ndim + 1 - a.ndim] + b.shape[1:]), (x, a, b, xa.astype(dtype))


def _lora_delta_bwd(scale, dtype, residuals, dy):
    x, a, b, xa = residuals
    x2, a2, b2 = _flat(x, a, b)
    dy = dy.reshape(-1, b2.shape[1])
    g = gradient_operand_dtype(dtype)
    d_xa = scale * _dot(dy, b2, (1, 1), g)  # (rows, rank)
    d_b = scale * _dot(xa, dy, (0, 0), g)  # (rank, out)
    # the barrier keeps XLA from folding the transpose back into the product (elsewhere: a (rank, in) copy)
    d_a = jax.lax.optimization_barrier(_dot(d_xa, x2, (0, 0), g)).T
    d_x = _dot(d_xa, a2, (1, 1), g)
    return (
        d_x.reshape(x.shape).astype(x.dtype),
        d_a.reshape(a.shape).astype(a.dtype),
        d_b.reshape(b.shape).astype(b.dtype),
    )


lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


class Dense(nnx.Module):
    """y = x @ kernel over the trailing `len(in_shape)` dims of x; inputs cast to `dtype`, fp32 accumulation.

    With `lora_rank > 0` it also holds LoRA factors (nnx.LoRAParam, so a filter can train only them):
    lora_a (in..., rank) and lora_b (rank, out...), adding `lora_scale * dropout(x) @ lora_a @ lora_b`.
    lora_b starts at zero, so a fresh adapter leaves the output unchanged.
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        axes: tuple,
        *,
        dtype,
        param_dtype,
        init_std: float,
        rngs: nnx.Rngs,
        lora_rank: int = 0,
        lora_scale: float = 1.0,
        lora_dropout: float = 0.0,
        lora_id: int = 0,
    ):
        self.kernel = param(
            rngs, nn.initializers.normal(init_std), tuple(in_shape) + tuple(out_shape), param_dtype, axes
        )
        self.num_in = len(in_shape)
        self.dtype = dtype
        self.lora_scale, self.lora_dropout, self.lora_id = lora_scale, lora_dropout, lora_id
        if lora_rank:
            n_in = len(in_shape)
            # PEFT's init: A ~ kaiming-uniform (a = sqrt(5)) over fan-in, B = 0.
            bound = 1.0 / math.sqrt(math.prod(in_shape))
            self.lora_a = nnx.LoRAParam(
                jax.random.uniform(rngs.params(), tuple(in_shape) + (lora_rank,), param_dtype, -bound, bound),
                out_sharding=tuple(axes[:n_in]) + (None,),
                eager_sharding=False,
            )
            self.lora_b = nnx.LoRAParam(
                jnp.zeros((lora_rank,) + tuple(out_shape), param_dtype),
                out_sharding=(None,) + tuple(axes[n_in:]),
                eager_sharding=False,
            )
        else:
            self.lora_a = self.lora_b = None

    def __call__(self, x: jax.Array, out_dtype=None, dropout_rng: jax.Array | None = None) -> jax.Array:
        out_dtype = jnp.dtype(out_dtype or self.dtype)
        x = x.astype(self.dtype)
        if self.lora_a is None:  # named, so that the "dots" remat policies can save it (see llama.REMAT)
            return checkpoint_name(matmul(x, self.kernel[...], self.num_in, self.dtype, out_dtype), "dense")
        f32 = jnp.dtype(jnp.float32)
        y = matmul(x, self.kernel[...], self.num_in, self.dtype, f32)
        xa = x
        if dropout_rng is not None and self.lora_dropout > 0:
            keep = jax.random.bernoulli(jax.random.fold_in(dropout_rng, self.lora_id), 1 - self.lora_dropout, x.shape)
            xa = jnp.where(keep, x / (1 - self.lora_dropout), 0).astype(x.dtype)
        delta = lora_delta(xa, self.lora_a[...], self.lora_b[...], self.lora_scale, self.dtype)
        return checkpoint_name((y + delta).astype(out_dtype), "dense")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def rms_norm(x, scale, eps: float, dtype):
    """x / rms(x) * scale: statistics in fp32 (as Hugging Face computes them), result in `dtype`.

    Its own backward keeps only x and one fp32 statistic per row (autodiff kept fp32 copies of x and of the
    normalised rows: 2 x 268 MB per norm at 7B width and 16K tokens), recomputes the rest in one fused pass,
    and sums the scale's gradient in fp32.
    """
    return _rms_norm(x, scale, eps, dtype)[0]


def _rms_norm(x, scale, eps, dtype):
    xf = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * inv).astype(dtype) * scale.astype(dtype), inv


def _rms_norm_fwd(x, scale, eps, dtype):
    y, inv = _rms_norm(x, scale, eps, dtype)
    return y, (x, scale, inv)


def _rms_norm_bwd(eps, dtype, residuals, dy):
    x, scale, inv = residuals
    f32 = jnp.float32
    normed = x.astype(f32) * inv
    dy = dy.astype(f32)
    # y = cast(normed) * cast(scale): d normed = dy * scale; d scale = sum over rows of dy * cast(normed)
    d_scale = jnp.sum((dy * normed.astype(dtype).astype(f32)).reshape(-1, x.shape[-1]), axis=0)
    d_normed = dy * scale.astype(dtype).astype(f32)
    dx = inv * (d_normed - normed * jnp.mean(d_normed * normed, axis=-1, keepdims=True))
    return dx.astype(x.dtype), d_scale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


class RMSNorm(nnx.Module):
    """LLaMA's RMSNorm: statistics in fp32, as Hugging Face computes them."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.scale = param(None, nn.initializers.ones, (dim,), param_dtype, ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps, jnp.dtype(self.dtype))


@jax.custom_vjp
def swiglu(gate, up):
    """silu(gate) * up, computed in fp32 and returned in gate's dtype.

    Its own backward keeps only the two projections (which the "dots" remat policies save anyway) and recomputes
    the sigmoid: autodiff of the bf16 expression kept six (T, mlp)-sized intermediates per layer (2.2 GB at 7B
    width and 16K tokens) and spent five elementwise passes on them.
    """
    g = gate.astype(jnp.float32)
    return (g * jax.nn.sigmoid(g) * up.astype(jnp.float32)).astype(gate.dtype)


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, dh):
    gate, up = residuals
    g, u, dh = gate.astype(jnp.float32), up.astype(jnp.float32), dh.astype(jnp.float32)
    sig = jax.nn.sigmoid(g)
    # d silu(g) / dg = sig * (1 + g * (1 - sig))
    d_gate = dh * u * sig * (1 + g * (1 - sig))
    return d_gate.astype(gate.dtype), (dh * g * sig).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class Embed(nnx.Module):
    def __init__(self, vocab_size: int, dim: int, *, dtype, param_dtype, init_std: float, rngs: nnx.Rngs):
        self.embedding = param(
            rngs, nn.initializers.normal(init_std), (vocab_size, dim), param_dtype, ("vocab", "embed")
        )
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        # Gather from a table whose hidden dim is whole (the FSDP all-gather every weight gets), so the
        # partitioner never has to reshard the gathered rows from "embed-sharded" to "batch-sharded".
        table = constrain(self.embedding[...], ("vocab", None))
        return jnp.take(table, ids, axis=0).astype(self.dtype)

    def lookup(self, ids: jax.Array) -> jax.Array:
        """The rows of `ids`, not differentiable (decoding). XLA's CPU backend gathers bf16 rows from an fp32
        copy of the whole table; gathered as their 16-bit patterns they are the same rows without that copy."""
        if self.embedding[...].dtype != jnp.bfloat16 or target_platform() != "cpu":
            return self(ids)
        table = constrain(self.embedding[...], ("vocab", None))
        bits = jnp.take(jax.lax.bitcast_convert_type(table, jnp.uint16), ids, axis=0)
        return jax.lax.bitcast_convert_type(bits, jnp.bfloat16).astype(self.dtype)
