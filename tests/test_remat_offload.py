"""The "offload" remat policy as the TPU compiler lays it out: what goes to the host's memory, per chip."""

import json
import os
import subprocess
import sys

from conftest import libtpu_or_skip

from mellama_jax.plan import tpu
from mellama_jax.plan.layouts import PlanRequest, markdown_tpu, plan_tpu

SHAPE = [  # a 6-layer bf16 GQA model whose shapes TPU tiles of (8, 128) hold unpadded
    "model.hidden_size=256",
    "model.intermediate_size=512",
    "model.num_heads=2",
    "model.num_kv_heads=1",
    "model.num_layers=6",
    "model.dtype=bfloat16",
    "model.attention=xla",
    "train.seq_len=256",
    "train.batch_size=8",
    "train.steps=2",
]


def test_offload_keeps_exactly_the_projections_the_backward_reads_in_host_memory():
    """`plan --target tpu` on 8 v5p chips (FSDP), a 6-layer bf16 model with GQA (2 query heads, 1 KV head, head
    dim 128; hidden 256, MLP 512: TPU tiles of (8, 128) hold these shapes unpadded), 256 tokens per chip, remat
    "offload". By hand, per layer and chip, the backward reads these projection outputs, offloaded: q (T x H x Dh),
    k and v (T x KV x Dh each), o (T x D: the residual stream it forms feeds the MLP's norm) and gate and up (T x F
    each: SwiGLU's backward); not down's (the residual add needs nothing). In bf16:
        2 B x 256 x (256 + 2 x 128 + 256 + 2 x 512) = 917,504 B per layer, 5,505,024 B for 6 layers,
    which XLA's memory analysis reports as the host's temporaries."""
    libtpu_or_skip()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "mellama_jax.cli", "plan", "--target", "tpu", "--topology", "v5p:2x2x2"]
        + ["--model", "tiny", "--layouts", "fsdp=8", *SHAPE, "model.remat=offload"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    table, body = out.stdout.split("\n{", 1)
    row = json.loads("{" + body)["layouts"][0]
    per_layer = 2 * 256 * (256 + 2 * 128 + 256 + 2 * 512)
    assert row["xla_host_bytes"] == 6 * per_layer == 5_505_024
    assert "host GiB / chip" in table


def test_the_tpu_table_puts_host_bytes_in_their_own_column():
    """`plan --target tpu`'s table, from a layout whose device and host figures differ: 10 GiB of arguments and 5
    of temporaries on the chip (15.00, fits), 3 on the host."""
    GiB = 2**30
    row = {
        "layout": "fsdp=8",
        "mesh": {"data": 1, "fsdp": 8, "tensor": 1},
        "per_chip_batch": 2,
        "xla_bytes": {"arguments": 10 * GiB, "temporaries": 5 * GiB, "outputs_not_aliased": 0, "total": 15 * GiB},
        "xla_host_bytes": 3 * GiB,
        "fits": True,
        "compile_s": 30.0,
        "cost": {"flops": 2e13, "bytes_accessed": 4 * GiB},
        "roofline_s": 0.05,
        "ideal_s": 0.04,
    }
    result = {"model": "m", "slices": 1, "topology": "v5p:2x2x2", "devices": 8, "chip": "v5p", "hbm_gib": 95}
    table = markdown_tpu({**result, "attention": "auto", "batch": [16, 4096, 1], "layouts": [row]})
    header, _, cells = (line.split(" | ") for line in table.splitlines()[-3:])
    assert dict(zip(header, cells))["host GiB / chip"] == "3.00"
    assert dict(zip(header, cells))["per-chip GiB (args + temp)"] == "15.00 (10.00 + 5.00)"


def test_a_layout_fits_a_chip_by_its_device_bytes_alone(monkeypatch):
    """Offloaded activations live in the host's memory: a layout whose device bytes fit a chip's HBM fits, however
    many bytes it offloads. The same plan on v5p chips, then on chips whose HBM lies halfway between its device
    bytes and its device plus host bytes."""
    libtpu_or_skip()
    environ = dict(os.environ)  # libtpu's start-up sets TPU_* variables that later runs would take for a pod
    request = PlanRequest(model="tiny", overrides=(*SHAPE, "model.remat=offload"), target="tpu", topology="v5p:2x2x2")
    try:
        row = plan_tpu(request)["layouts"][0]
        device, host = row["xla_bytes"]["total"], row["xla_host_bytes"]
        monkeypatch.setitem(tpu.TPU_CHIPS, "v5p", tpu.Chip((device + host / 2) / 2**30, 459, 2.76))
        tight = plan_tpu(request)["layouts"][0]
    finally:
        os.environ.clear()
        os.environ.update(environ)
    assert host > 0 and tight["xla_bytes"]["total"] == device and tight["fits"] is True
