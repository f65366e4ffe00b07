"""`bench attention`: forward + backward of each attention implementation on one device, with its error
against the float32 XLA reference on the same inputs (packed documents included), and TFLOP/s."""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mellama_jax.model import attention
from mellama_jax.options import POSITIVE, name_list, option


@dataclasses.dataclass(frozen=True)
class AttentionBenchRequest:
    """One `bench attention` run: what `mellama-jax bench attention` parses, and what `bench_attention` takes."""

    # one row each (model.attention's names)
    impls: tuple[str, ...] = option(("xla", "dot_product", "cudnn", "cudnn_causal"), type=name_list)
    batch: int = option(1, type=POSITIVE)
    seq: int = option(4096, type=POSITIVE)
    heads: int = option(32, type=POSITIVE)
    kv_heads: int = option(32, type=POSITIVE)
    head_dim: int = option(128, type=POSITIVE)
    dtype: str = option("bfloat16")  # of the timed runs; the reference is always float32 XLA
    docs: int = option(1, "packed documents per row", type=POSITIVE)
    steps: int = option(10, type=POSITIVE)  # timed steps after the compiling one; the median is reported


def bench_attention(r: AttentionBenchRequest, *, seed: int = 0, max_segments: int = 32) -> dict:
    """docs > 1 packs that many equal documents per row (segment ids 1..docs), which cudnn_causal ignores by
    design: its error is then reported, not hidden. cudnn takes them in its packed layout while docs <=
    max_segments, else as a bias."""
    rng = np.random.default_rng(seed)
    batch, seq = r.batch, r.seq
    shapes = {
        "q": (batch, seq, r.heads, r.head_dim),
        "k": (batch, seq, r.kv_heads, r.head_dim),
        "v": (batch, seq, r.kv_heads, r.head_dim),
        "g": (batch, seq, r.heads, r.head_dim),
    }
    x = {n: jnp.asarray(rng.normal(size=s), jnp.float32) for n, s in shapes.items()}
    seg = jnp.asarray(np.broadcast_to(np.repeat(np.arange(1, r.docs + 1), -(-seq // r.docs))[:seq], (batch, seq)))

    def fwd_bwd(name, dt, causal=True):
        mask = attention.build_mask(seg, name, max_segments)

        def loss(q, k, v):
            return jnp.sum(attention.attend(q, k, v, mask, name, causal=causal).astype(jnp.float32) * x["g"])

        f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        return f, [x[n].astype(dt) for n in "qkv"]

    # the reference: the whole score matrix under the causal mask (causal=False: no blocks skipped)
    f_ref, args_ref = fwd_bwd("xla", jnp.float32, causal=False)
    _, ref_grads = f_ref(*args_ref)
    # model FLOPs as MaxText counts them: QK^T and PV, causal half, forward + backward = 3 x forward
    flops = 3 * 4 * batch * seq * seq * r.heads * r.head_dim / 2
    rows = []
    for name in r.impls:
        try:
            rows.append({"impl": name, **_timed(*fwd_bwd(name, jnp.dtype(r.dtype)), r.steps, ref_grads, flops)})
        except Exception as e:  # an implementation the backend lacks (cuDNN on CPU) is reported, not fatal
            rows.append({"impl": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    return {
        "benchmark": "attention",
        "device": jax.devices()[0].device_kind,
        "batch": batch,
        "seq": seq,
        "heads": r.heads,
        "kv_heads": r.kv_heads,
        "head_dim": r.head_dim,
        "dtype": r.dtype,
        "docs": r.docs,
        "rows": rows,
    }


def _timed(f, args, steps: int, ref_grads, flops: float) -> dict:
    """One implementation's compile time, median forward + backward over `steps`, TFLOP/s, and its gradients'
    relative error against the reference's."""
    start = time.perf_counter()
    out = jax.block_until_ready(f(*args))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    errors = {
        f"rel_err_d{n}": float(jnp.linalg.norm(g.astype(jnp.float32) - r) / jnp.linalg.norm(r))
        for n, g, r in zip("qkv", out[1], ref_grads)
    }
    median = statistics.median(times)
    return {"compile_s": compile_s, "fwd_bwd_ms": median * 1e3, "tflops": flops / median / 1e12, **errors}
