"""The ahead-of-time planner: XLA's memory analysis of the real train step on simulated devices."""

import subprocess
import sys

import jax
import pytest

from mellama_jax.bench.plan import PlanRequest, analytical, plan, plan_layout
from mellama_jax.config import CONFIG_ROOT, load_config


def test_small_model_state_bytes_match_by_hand():
    cfg = load_config(None, ["model=tiny-gqa", "train.seq_len=32", "train.batch_size=8", "train.steps=2",
                             "mesh.ici={data: 2, fsdp: 4, tensor: 1}"])
    row = plan_layout(cfg)
    est = analytical(cfg)
    batch = 5 * (8 // 8) * 32 * 4  # five (B, T) int32/float32 arrays, one row per device
    scalars = 3 * 4  # step and two optimizer counts (int32)
    assert row["xla_bytes"]["arguments"] == est["params"] + est["optimizer"] + batch + scalars
    assert row["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}


def test_bad_layouts_are_reported_not_raised():
    overrides = ("model=tiny-gqa", "train.seq_len=32", "train.batch_size=8", "train.steps=2")
    result = plan(PlanRequest(overrides=overrides, devices=jax.device_count(), layouts=("tensor=8", "fsdp=8"),
                              memory_gib=80.0))
    bad, good = result["layouts"]
    assert "does not divide" in bad["error"] and good["fits"] is True


@pytest.mark.slow  # 20 s of two CLI plans (make test-all runs it); the planner's rows are checked above
def test_70b_on_160_devices_and_13b_on_8():
    out = subprocess.run([sys.executable, "-m", "mellama_jax.cli", "plan", "--config",
                          str(CONFIG_ROOT / "me-llama-70b-pretrain.yaml"), "--devices", "160"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    row = [l for l in out.stdout.splitlines() if l.startswith("| config")][0]
    assert "'fsdp': 32" in row and "| 24.11 |" in row and "| yes |" in row  # 69B x 12 B / 32 devices
    out = subprocess.run([sys.executable, "-m", "mellama_jax.cli", "plan", "--config",
                          str(CONFIG_ROOT / "me-llama-13b-pretrain.yaml"), "--devices", "8",
                          "mesh.dcn={data: 1, fsdp: 1, tensor: 1}", "train.batch_size=128"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| 18.19 |" in [l for l in out.stdout.splitlines() if l.startswith("| config")][0]


def test_planned_activations_follow_the_microbatch_not_the_global_batch():
    """Gradient accumulation runs one microbatch at a time: 32 sequences in 4 microbatches hold the activations
    of 8, as a batch of 8 does, and a quarter of what 32 at once hold (every term is linear in the sequences)."""
    common = ["model=tiny-gqa", "train.seq_len=32", "train.steps=2", "mesh.ici={data: 2, fsdp: 4, tensor: 1}"]
    accumulated = analytical(load_config(None, common + ["train.batch_size=32", "train.grad_accum=4"]))
    small = analytical(load_config(None, common + ["train.batch_size=8"]))
    whole = analytical(load_config(None, common + ["train.batch_size=32"]))
    assert accumulated["activations"] == small["activations"] == whole["activations"] // 4
