"""Timing real train steps, shared by `bench mesh`, `bench pair`, `bench baseline` and `plan --search --calibrate`:
a config's step compiled on a synthetic batch, timed with the state threaded through, and on a CPU each step
against the matmul rate measured beside it."""

from __future__ import annotations

import dataclasses
import gzip
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from mellama_jax.config import load_config
from mellama_jax.options import POSITIVE, layout_list, option
from mellama_jax.sharding import make_mesh
from mellama_jax.train import flops
from mellama_jax.train.step import compile_ahead, plan_trainer


@dataclasses.dataclass(frozen=True)
class LayoutsBench:
    """What `bench mesh` and `bench memory` share: a model preset's train step at one shape, one row per layout."""

    model: str = option("bench-60m")  # a model preset
    # ici layouts such as "fsdp=4,tensor=2"; each benchmark gives its own default
    layouts: tuple[str, ...] = option((), '";"-separated ici layouts', type=layout_list)
    seq: int = option(256, type=POSITIVE)
    batch: int = option(8, type=POSITIVE)


def torch_device() -> str:
    """Where the transformers side of a paired benchmark runs: the GPU when torch has one, as ours does."""
    import torch  # the optional interop extra, which `--sides ours` does not need

    return "cuda" if torch.cuda.is_available() else "cpu"


def time_steps(run_step, carry, warmup: int, steps: int, beside=None) -> tuple[list[float], object, list]:
    """Seconds per call of `carry = run_step(carry)` after `warmup` untimed calls, the last carry, and what
    `beside()` (if given) returned after each timed call, untimed."""
    for _ in range(warmup):
        carry = run_step(carry)
    times, besides = [], []
    for _ in range(steps):
        start = time.perf_counter()
        carry = run_step(carry)
        times.append(time.perf_counter() - start)
        if beside is not None:
            besides.append(beside())
    return times, carry, besides


def synthetic_batch(cfg, seed: int = 0) -> dict:
    """A host batch of random tokens in the train step's layout (one unpacked document per row)."""
    B, T = cfg.train.batch_size, cfg.train.seq_len
    tokens = np.random.default_rng(seed).integers(3, cfg.model.vocab_size, (B, T + 1))
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(T), (B, T)),
        "segment_ids": np.ones((B, T)),
        "loss_weights": np.ones((B, T)),
    }


def _profile(run, carry, compiled, out_dir: str | Path, steps: int = 2) -> None:
    """A device trace of `steps` more steps (Perfetto JSON: `bench trace` summarises it) and the optimized HLO,
    which maps kernel names back to the model's operations."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(steps):
                carry = run(carry)
        shutil.copy(next(Path(tmp).rglob("perfetto_trace.json.gz")), out / "trace.json.gz")
    with gzip.open(out / "hlo.txt.gz", "wt") as f:
        f.write(compiled.as_text())


@dataclasses.dataclass
class _Step:
    """One config's compiled train step on a synthetic batch, with the state it threads through."""

    cfg: object
    trainer: object
    compiled: object
    state: object
    frozen: object
    batch: dict
    compile_s: float

    def __call__(self, state):
        with jax.set_mesh(self.trainer.mesh):
            state, metrics = self.compiled(state, self.frozen, self.batch)
        metrics["loss"].block_until_ready()
        return state

    def mfu(self, seconds: float, peak_per_device: float) -> float:
        cfg, n = self.cfg, self.trainer.mesh.size
        B, T = cfg.train.batch_size, cfg.train.seq_len
        return flops.mfu(cfg.model, T, B * T / seconds, peak_per_device * 1e12, n, cfg.adapters)

    def peak_and_mfu(self, times: list[float], rates: list[float]) -> tuple[float, float | None]:
        """(peak TFLOP/s per device, MFU) of timed steps: with the matmul rates measured beside them (a CPU), the
        median rate and the median of each step's MFU against its own rate; else the device's peak and the
        median step's MFU against it (None for an unknown peak)."""
        n = self.trainer.mesh.size
        if rates:
            return statistics.median(rates) / n, statistics.median(self.mfu(t, r / n) for t, r in zip(times, rates))
        peak = flops.peak_tflops_per_device(n)
        return peak, self.mfu(statistics.median(times), peak) if peak else None


def compile_step(overrides: list[str], seed: int = 0, devices: list | None = None, config=None) -> _Step:
    cfg = load_config(config, ["train.steps=1000"] + list(overrides))
    trainer, init = plan_trainer(cfg, make_mesh(cfg.mesh, devices))
    with jax.set_mesh(trainer.mesh):
        state, frozen = init()
    batch = trainer.shard_batch(synthetic_batch(cfg, seed))
    start = time.perf_counter()
    compiled = compile_ahead(trainer, init)
    return _Step(cfg, trainer, compiled, state, frozen, batch, time.perf_counter() - start)


def cpu_peak_probe():
    """On a CPU, a callable measuring the matmul rate now (the better of two probes), else None: steps are
    compared with the rate measured right after each, as a shared VM's rate drifts by 10-15% over seconds."""
    if jax.default_backend() != "cpu":
        return None
    probe = flops.matmul_probe()
    return lambda: max(probe(), probe())


def jax_step_timing(
    overrides: list[str],
    warmup: int = 2,
    steps: int = 5,
    seed: int = 0,
    devices: list | None = None,
    profile_dir: str | Path | None = None,
    config=None,
) -> dict:
    """`config` (a recipe YAML, default the built-in defaults) with `overrides`, timed on `devices`."""
    step = compile_step(overrides, seed, devices, config)
    cfg, n = step.cfg, step.trainer.mesh.size
    B, T = cfg.train.batch_size, cfg.train.seq_len
    # Each step donates the state it is given, so the timed calls thread it through. On a CPU the peak is the
    # matmul rate measured beside each step, and the MFU the median of the steps' ratios to theirs.
    times, state, rates = time_steps(step, step.state, warmup, steps, beside=cpu_peak_probe())
    if profile_dir:
        _profile(step, state, step.compiled, profile_dir)
    median = statistics.median(times)
    tokens_per_s = B * T / median
    tflops = flops.train_flops_per_token(cfg.model, T, cfg.adapters) * tokens_per_s / n / 1e12
    peak, mfu = step.peak_and_mfu(times, rates)
    mem = step.compiled.memory_analysis()
    device_peak = None
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if stats:
        device_peak = stats.get("peak_bytes_in_use")
    return {
        "mesh": dict(step.trainer.mesh.shape),
        "compile_s": step.compile_s,
        "step_s_median": median,
        "step_s_all": times,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": tokens_per_s / n,
        "model_tflops_per_device": tflops,
        "peak_tflops_per_device": peak,
        "mfu": mfu,
        "peak_tflops_beside_steps": rates,
        "xla_bytes_per_device": mem.argument_size_in_bytes + mem.temp_size_in_bytes,
        "device_peak_bytes": device_peak,
    }


def one_device(model: str, seq: int, batch: int, dtype: str) -> list[str]:
    """Config overrides for one step of `model` on one device: what `bench baseline` and `bench pair` time."""
    return [
        f"model={model}",
        f"train.seq_len={seq}",
        f"train.batch_size={batch}",
        f"model.dtype={dtype}",
        "mesh.ici={data: 1, fsdp: 1, tensor: 1}",
    ]
