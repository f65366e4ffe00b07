"""Splash attention (TPU Pallas kernel), run here in Pallas's interpreter, against the XLA reference; and the
train step compiled for TPU devices by `plan --target tpu` (needs libtpu: the `tpu` extra)."""

import dataclasses
import importlib.util
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import libtpu_or_skip
from flax import linen as nn
from jax.sharding import AxisType
from train_helpers import run_steps, synthetic_batch

from mellama_jax.config import DEFAULT_RULES, ConfigError, load_model_preset
from mellama_jax.model import attention
from mellama_jax.train.flops import matmul_params


def _packed_rows(T: int) -> np.ndarray:
    """Row 0: three documents (lengths 100, 80, T - 210) then 30 tokens of padding (segment id 0); row 1: one
    document filling the row. The boundaries fall inside the kernel's 128-token blocks."""
    seg = np.full((2, T), 7, np.int32)
    seg[0, :100], seg[0, 100:180], seg[0, 180:], seg[0, T - 30 :] = 1, 2, 3, 0
    return seg


def _outputs_and_grads(impl, q, k, v, g, seg, mesh=None, blocks=(128, 128)):
    """attend's output and the q/k/v gradients of sum(out * g); with a mesh, under it and the default rule table
    (batch over data and fsdp, heads and KV heads over tensor)."""

    @jax.jit
    def run(q, k, v, seg):
        mask = attention.build_mask(seg, impl, 8)
        out, vjp = jax.vjp(lambda q, k, v: attention.attend(q, k, v, mask, impl, True, blocks), q, k, v)
        return (out, *vjp(g))

    if mesh is None:
        return run(q, k, v, jnp.asarray(seg))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        return run(q, k, v, jnp.asarray(seg))


@pytest.mark.parametrize(
    "dtype,heads,kv_heads,T,sharded",
    [("float32", 8, 2, 256, True), ("float32", 4, 4, 200, False), ("bfloat16", 8, 2, 256, False)],
    ids=["gqa-fp32-mesh", "mha-fp32-ragged", "gqa-bf16"],
)
def test_splash_matches_the_reference(rng, dtype, heads, kv_heads, T, sharded):
    """Outputs and q/k/v gradients of the kernel (blocks of 128, so a 256-token row is 2 x 2 blocks with the
    upper one skipped by the causal mask) equal the XLA reference on packed rows with several documents and
    padding, grouped-query (8 heads over 2) and multi-head (with a 200-token row, padded to 256 inside). The first
    case runs splash in a shard_map over a data 2 x tensor 2 mesh: a row and 4 query heads over 1 KV head per
    device. fp32 within 1e-4; bf16 within 2 bf16 ulps (2 x 2^-8 relative) of each tensor's largest value, both
    sides rounding their bf16 products differently."""
    D = 64
    dt = jnp.dtype(dtype)
    q, g = (jnp.asarray(rng.normal(size=(2, T, heads, D)), dt) for _ in range(2))
    k, v = (jnp.asarray(rng.normal(size=(2, T, kv_heads, D)), dt) for _ in range(2))
    seg = _packed_rows(T)
    assert isinstance(attention.build_mask(jnp.asarray(seg), "splash", 8), attention.Segments)
    mesh = (
        jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), (AxisType.Auto,) * 3, devices=jax.devices()[:4])
        if sharded
        else None
    )
    got = _outputs_and_grads("splash", q, k, v, g, seg, mesh)
    ref = _outputs_and_grads("xla", q, k, v, g, seg)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        tol = 1e-4 if dtype == "float32" else 2 * 2.0**-8 * np.abs(b).max()
        np.testing.assert_allclose(a, b, atol=tol, rtol=0, err_msg=name)


def test_splash_choice_config_and_decoding():
    """`splash` is a valid choice with block sizes in 128s; 'auto' picks it only for TPU (here: the reference);
    a boolean mask or decoding (not causal-aligned) runs the reference."""
    base = load_model_preset("tiny-gqa")
    dataclasses.replace(base, attention="splash", splash_block_q=1024, splash_block_kv=256).validate()
    with pytest.raises(ConfigError, match="splash_block_kv must be a multiple of 128"):
        dataclasses.replace(base, splash_block_kv=100).validate()
    assert attention.resolve("auto") == "xla"  # no mesh of TPU devices here
    assert attention._splash_block(512, 4096) == 512 and attention._splash_block(512, 384) == 384
    assert attention._splash_block(512, 640) == 128 and attention._splash_block(2048, 1536) == 1536
    q = jnp.ones((1, 5, 4, 8))
    k = v = jnp.ones((1, 5, 2, 8))
    bool_mask = attention.make_mask(jnp.ones((1, 5), jnp.int32), jnp.ones((1, 5), jnp.int32))
    np.testing.assert_array_equal(
        attention.attend(q, k, v, bool_mask, "splash", causal=True), attention.attend(q, k, v, bool_mask, "xla")
    )


@pytest.mark.slow  # 25 s; splash against the reference is checked kernel by kernel above
def test_train_step_with_splash_equals_xla_under_a_mesh():  # ~25 s of CPU: the splash step interpreted
    """The tiny grouped-query model's real train step (scanned layers, full remat) on 8 devices as data 2 x fsdp
    2 x tensor 2, so splash runs in a shard_map with a quarter of the rows and half of the (KV) heads on each
    device: the losses of two steps and the gradient norms equal the xla model's."""
    rng = np.random.default_rng(0)
    batches = [synthetic_batch(rng, 8, 128, 256) for _ in range(2)]
    common = [
        "train.seq_len=128",
        "model.remat=full",
        "model.num_layers=2",
        "mesh.ici={data: 2, fsdp: 2, tensor: 2}",
        "model.splash_block_q=128",
        "model.splash_block_kv=128",
    ]
    ref_losses, ref_params, _, _ = run_steps(common + ["model.attention=xla"], batches)
    losses, params, _, _ = run_steps(common + ["model.attention=splash"], batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for key in ref_params:
        np.testing.assert_allclose(params[key], ref_params[key], atol=1e-6, err_msg=str(key))


def test_plan_target_tpu_compiles_splash_for_a_tpu_topology():  # ~11 s of CPU: two TPU compiles
    """`plan --target tpu` compiles the tiny model's train step for 8 abstract TPU v5p chips (v5p:2x2x2) with
    the TPU compiler: `auto` chooses splash there and its three kernels (forward, dq, dkv) lower to Mosaic calls;
    the layout fits a v5p's 95 GiB, and the cost analysis, corrected for the scanned layers, gives at least the
    model's matmul FLOPs (6 per weight per token; splash's own FLOPs are not seen) and a roofline time."""
    libtpu_or_skip()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mellama_jax.cli",
            "plan",
            "--target",
            "tpu",
            "--topology",
            "v5p:2x2x2",
            "--model",
            "tiny-gqa",
            "--layouts",
            "fsdp=4,tensor=2",
            "model.attention=auto",
            "train.seq_len=256",
            "train.batch_size=8",
            "train.steps=2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout[out.stdout.index("\n{") + 1 :])
    row = result["layouts"][0]
    assert result["chip"] == "v5p" and result["devices"] == 8 and result["hbm_gib"] == 95
    assert row["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2} and row["fits"] is True
    assert row["mosaic_calls"] >= 3
    cfg = load_model_preset("tiny-gqa")
    matmul_flops = 6 * matmul_params(cfg) * 8 * 256 / 8
    assert matmul_flops < row["cost"]["flops"] < 2 * matmul_flops
    assert row["roofline_s"] >= row["cost"]["flops"] / 459e12


def test_gradient_operands_follow_the_compile_target_not_the_host():
    """One platform function for model code: under a mesh of abstract TPU chips (what `plan --target tpu` compiles
    for on a CPU host) gradient matmuls keep bf16 operands, as the TPU runs them; on the CPU host, fp32 copies."""
    libtpu_or_skip()
    import os

    from mellama_jax.model import layers
    from mellama_jax.plan.tpu import topology_devices

    environ = dict(os.environ)  # libtpu's start-up sets TPU_* variables that later runs would take for a pod
    try:
        devices = topology_devices("v5p:2x2x1")
    finally:
        os.environ.clear()
        os.environ.update(environ)
    mesh = jax.sharding.Mesh(np.array(devices).reshape(len(devices)), ("fsdp",))
    with jax.set_mesh(mesh):
        assert layers.target_platform() == "tpu"
        assert layers.gradient_operand_dtype(jnp.bfloat16) == jnp.bfloat16
    assert layers.gradient_operand_dtype(jnp.bfloat16) == jnp.float32  # this CPU host
    # the program itself: the train step (bf16 compute) lowered for the TPU chips multiplies bf16 operands in every
    # dot, forward (10) and gradients (20); lowered for this host's CPUs the 20 gradient dots take fp32 copies
    tpu, cpu = (_dot_operand_types(_lowered_train_step(d)) for d in (devices, jax.devices()[: len(devices)]))
    assert tpu == {("bf16", "bf16"): 30}
    assert cpu == {("bf16", "bf16"): 10, ("f32", "f32"): 20}


def _lowered_train_step(devices) -> str:
    """The StableHLO of tiny-gqa's train step in bf16 (xla attention), lowered for `devices` as `plan` does."""
    from mellama_jax import sharding
    from mellama_jax.config import load_config
    from mellama_jax.saved_params import abstract_like
    from mellama_jax.train.step import BATCH_KEYS, make_train_step, plan_trainer

    cfg = load_config(
        None,
        [
            "model=tiny-gqa",
            "model.dtype=bfloat16",
            "model.attention=xla",
            "train.seq_len=64",
            "train.batch_size=4",
            "train.steps=2",
            "mesh.ici={data: 1, fsdp: -1, tensor: 1}",
        ],
    )
    trainer, init = plan_trainer(cfg, sharding.make_mesh(cfg.mesh, devices))
    state, frozen = jax.eval_shape(init)
    batch = {
        k: jax.ShapeDtypeStruct(
            (4, 64), jnp.float32 if k == "loss_weights" else jnp.int32, sharding=trainer.batch_sharding
        )
        for k in BATCH_KEYS
    }
    with jax.set_mesh(trainer.mesh):
        return (
            make_train_step(trainer)
            .jitted.lower(
                abstract_like(state, trainer.state_shardings), abstract_like(frozen, trainer.frozen_shardings), batch
            )
            .as_text()
        )


def _dot_operand_types(stablehlo: str) -> dict:
    """{(lhs element type, rhs element type): count} over the module's dot_generals."""
    import collections
    import re

    found = re.findall(r"stablehlo.dot_general[^\n]*?: \(tensor<([^>]*)>, tensor<([^>]*)>\)", stablehlo)
    return dict(collections.Counter((a.split("x")[-1], b.split("x")[-1]) for a, b in found))


def test_plan_target_tpu_without_libtpu_says_which_extra(monkeypatch, capsys):
    """Where libtpu is missing, one line names the extra to install, and the exit code is 2."""
    from mellama_jax import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    assert cli.main(["plan", "--target", "tpu", "--topology", "v5p:2x2x1", "--model", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "mellama-jax[tpu]" in err
    assert cli.main(["plan", "--target", "tpu", "--topology", "v9x:2x2", "--model", "tiny"]) == 2
    assert "v5p" in capsys.readouterr().err
