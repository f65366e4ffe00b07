"""`bench convert`: both conversion directions on a checkpoint of LLaMA2-70B's width and vocabulary with few
layers, measuring peak RSS and throughput beside a plain copy of the same bytes, in one run.

Each conversion runs in its own process so its peak RSS (from wait4) is its own.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from mellama_jax.config import load_model_preset
from mellama_jax.convert.export import hf_config
from mellama_jax.convert.hf import tensor_specs
from mellama_jax.convert.safetensors_stream import write_streaming

GB = 1e9


def write_random_hf(out: Path, layers: int, shard_bytes: int = 2 * 10**9) -> tuple[int, int]:
    """A bf16 HF directory with random bits; returns (total bytes, largest tensor bytes)."""
    cfg = dataclasses.replace(load_model_preset("llama2-70b"), num_layers=layers)
    out.mkdir(parents=True)
    names = []
    for spec in tensor_specs(cfg):
        for i in range(layers) if spec.stacked else [None]:
            names.append((spec.hf_name.format(i=i), spec.hf_shape))
    rng = np.random.default_rng(0)

    def fetch(name):
        shape = dict(names)[name]

        return rng.integers(0, 2**14, shape, dtype=np.uint16).view(ml_dtypes.bfloat16)  # finite values

    shards, current, size = [], [], 0
    for name, shape in names:
        nbytes = int(np.prod(shape)) * 2
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_streaming(out / file, [(n, s, "bfloat16") for n, s in shard], fetch, {"format": "pt"})
        weight_map.update({n: file for n, _ in shard})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (out / "config.json").write_text(json.dumps(hf_config(cfg, "bfloat16")))
    largest = max(int(np.prod(s)) * 2 for _, s in names)
    return total, largest


# The child reports its own high-water mark (VmHWM): rusage's maxrss would include the parent's memory
# that a fork copied before exec.
_RUN = """
import sys, runpy
sys.argv = sys.argv[1:]
try:
    runpy.run_module(sys.argv[0], run_name="__main__")
except SystemExit as e:
    if e.code not in (0, None):
        raise
finally:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    print("VMHWM_KB", hwm, file=sys.stderr)
"""


def _timed(args: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of `python -m args...` in a child process."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _RUN] + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{args} failed: {proc.stderr[-2000:]}")
    hwm = [l for l in proc.stderr.splitlines() if l.startswith("VMHWM_KB")][-1].split()[1]
    return elapsed, int(hwm) * 1024


def bench_convert(layers: int = 2, workdir: str | None = None) -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=workdir))
    try:
        total, largest = write_random_hf(root / "hf", layers)
        start = time.perf_counter()
        (root / "copy").mkdir()
        for f in (root / "hf").glob("*.safetensors"):
            shutil.copyfile(f, root / "copy" / f.name)
        copy_s = time.perf_counter() - start
        shutil.rmtree(root / "copy")
        cli = ["mellama_jax.cli", "convert"]
        h2j_s, h2j_rss = _timed(cli + ["hf-to-jax", str(root / "hf"), str(root / "jax")])
        j2h_s, j2h_rss = _timed(cli + ["jax-to-hf", str(root / "jax"), str(root / "back"), "--shard-size", "2GB"])
        _, baseline_rss = _timed(["mellama_jax.convert.api"])  # imports alone
    finally:
        shutil.rmtree(root, ignore_errors=True)
    budget = 2 * largest + 1.5 * GB
    return {
        "benchmark": "convert",
        "layers": layers,
        "bytes": total,
        "largest_tensor_bytes": largest,
        "copy_gb_per_s": total / copy_s / GB,
        "hf_to_jax": {"seconds": h2j_s, "gb_per_s": total / h2j_s / GB, "peak_rss_gb": h2j_rss / GB},
        "jax_to_hf": {"seconds": j2h_s, "gb_per_s": total / j2h_s / GB, "peak_rss_gb": j2h_rss / GB},
        "python_with_imports_rss_gb": baseline_rss / GB,
        "goal_peak_rss_gb": budget / GB,
        "goal_met_rss": max(h2j_rss, j2h_rss) < budget,
        "throughput_vs_copy": min(total / h2j_s, total / j2h_s) / (total / copy_s),
    }


if __name__ == "__main__":
    print(json.dumps(bench_convert(int(sys.argv[1]) if len(sys.argv) > 1 else 2), indent=1))
