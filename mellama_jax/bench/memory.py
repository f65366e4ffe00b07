"""`bench memory`: does the planner's per-device memory (XLA's memory analysis of the ahead-of-time compiled
train step) match what a real step uses? On simulated CPU devices all devices live in this process, so the
measure is the growth of its resident memory while the state is created and steps run (sampled every
millisecond), against the planner's total times the number of devices. Run in a fresh process."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
import threading
import time

import jax

from mellama_jax.bench.timing import LayoutsBench, synthetic_batch
from mellama_jax.config import load_config
from mellama_jax.options import POSITIVE, layout_list, option, overrides
from mellama_jax.plan.layouts import plan_layout
from mellama_jax.sharding import layout_overrides
from mellama_jax.train.step import compile_ahead, plan_trainer


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRss:
    def __init__(self):
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def bench_memory(overrides: list[str], devices: int = 8, steps: int = 3, config: str | None = None) -> dict:
    try:
        jax.config.update("jax_num_cpu_devices", devices)
    except RuntimeError:
        if jax.device_count() != devices:
            raise
    if jax.default_backend() != "cpu":
        raise RuntimeError(
            "bench memory measures process memory: CPU only (on GPUs, bench mesh reports "
            "the device's peak_bytes_in_use)"
        )

    cfg = load_config(config, ["train.steps=1000"] + list(overrides))
    planned = plan_layout(cfg)  # the planner's own path (abstract shapes), which is what is being checked
    trainer, init = plan_trainer(cfg)
    host_batch = synthetic_batch(cfg)
    with jax.set_mesh(trainer.mesh):  # compile both before the baseline: compilation memory is not the step's
        init_c = jax.jit(init, out_shardings=(trainer.state_shardings, trainer.frozen_shardings)).lower().compile()
    step_c = compile_ahead(trainer, init)
    gc.collect()
    baseline = _rss()
    with _PeakRss() as peak, jax.set_mesh(trainer.mesh):
        state, frozen = init_c()
        batch = trainer.shard_batch(host_batch)
        for _ in range(steps):
            state, metrics = step_c(state, frozen, batch)
        jax.block_until_ready(metrics["loss"])
    measured = peak.peak - baseline
    planned_total = planned["xla_bytes"]["total"] * trainer.mesh.size
    return {
        "mesh": dict(trainer.mesh.shape),
        "planned_bytes_per_device": planned["xla_bytes"],
        "planned_total_bytes": planned_total,
        "measured_rss_growth_bytes": measured,
        "ratio_measured_to_planned": measured / planned_total,
    }


@dataclasses.dataclass(frozen=True)
class MemoryBenchRequest(LayoutsBench):
    """One `bench memory` run: what `mellama-jax bench memory` parses, and what `bench_memory_layouts` takes; each
    layout is measured in a process of its own."""

    layouts: tuple[str, ...] = option(
        ("fsdp=8", "data=2,fsdp=2,tensor=2", "data=8"), '";"-separated ici layouts', type=layout_list
    )
    overrides: tuple[str, ...] = overrides("more config overrides, e.g. train.mode=lora")  # after the layout's
    devices: int = option(8, type=POSITIVE)  # simulated CPU devices
    config: str | None = option(None, "a recipe YAML (default: the built-in defaults)")


def bench_memory_layouts(r: MemoryBenchRequest) -> dict:
    """Each layout in its own fresh process (a clean memory baseline), with glibc's default malloc: the speed
    tunables `make` sets (everything on the brk heap, never trimmed, huge pages) keep freed buffers resident,
    so resident memory would read 1.6-1.9x what is live."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    rows = []
    for layout in r.layouts:
        overrides = [
            f"model={r.model}",
            f"train.seq_len={r.seq}",
            f"train.batch_size={r.batch}",
            *layout_overrides(layout),
            *r.overrides,
        ]
        config = ["--config", r.config] if r.config else []
        out = subprocess.run(
            [sys.executable, "-m", "mellama_jax.bench.memory", str(r.devices), *config, *overrides],
            env=env,
            capture_output=True,
            text=True,
        )
        if out.returncode:
            rows.append({"layout": layout, "error": out.stderr.strip().splitlines()[-1]})
        else:
            rows.append({"layout": layout, **json.loads(out.stdout.strip().splitlines()[-1])})
    return {
        "config": r.config,
        "model": r.model,
        "seq": r.seq,
        "batch": r.batch,
        "devices": r.devices,
        "extra": list(r.overrides),
        "layouts": rows,
    }


if __name__ == "__main__":
    import json
    import sys

    args = sys.argv[2:]
    config = args[1] if args[:1] == ["--config"] else None
    print(json.dumps(bench_memory(args[2:] if config else args, int(sys.argv[1]), config=config)))
