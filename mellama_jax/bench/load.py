"""`bench load`: the peak resident memory of `mellama-jax generate`'s backend in a fresh process (simulated CPU
devices, glibc's default malloc), on a bf16 checkpoint of a preset's width with few layers (random weights),
against the model's bytes (what an uncompressed checkpoint holds): once the model is loaded and laid out for
decoding, and after 8 tokens. The goal (docs/benchmarks.md): at most 1.3x the checkpoint plus 1.2 GiB of runtime."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from flax import nnx

from mellama_jax.config import load_model_preset, to_dict
from mellama_jax.data.tokenizer import Tokenizer
from mellama_jax.demo import sample_texts
from mellama_jax.dtypes import np_dtype
from mellama_jax.eval.run import JaxBackend
from mellama_jax.model import init_abstract
from mellama_jax.options import POSITIVE, layout_list, name_list, option
from mellama_jax.saved_params import save_params

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class LoadBenchRequest:
    """One `bench load` run: what `mellama-jax bench load` parses, and what `bench_load` takes."""

    model: str = option("llama2-13b", "model preset whose width is used (random weights)")
    layers: int = option(2, type=POSITIVE)
    meshes: tuple[str, ...] = option(
        ("tensor=4", "none"), '";"-separated decoding layouts; none: a single device', type=layout_list
    )
    # a row per mesh and dtype
    dtypes: tuple[str, ...] = option(
        ("bfloat16", "float32"), "comma-separated dtypes the bf16 checkpoint is loaded as", type=name_list
    )
    devices: int = option(4, "simulated CPU devices", type=POSITIVE)


def write_checkpoint(model: str, layers: int, dtype: str, out: Path, seed: int = 0) -> int:
    """Random parameters of `model`'s width with `layers` layers, stored in `dtype`, with its model.yaml and the
    demo's tokenizer, into `out`: a folder `generate --model` takes. Returns the parameters' bytes."""
    cfg = dataclasses.replace(load_model_preset(model), num_layers=layers, param_dtype=dtype, dtype=dtype)
    rng = np.random.default_rng(seed)
    state = nnx.state(init_abstract(cfg), nnx.Param)
    for path, var in nnx.to_flat_state(state):
        value = (
            np.ones(var.shape, np.float32)
            if "norm" in "/".join(map(str, path))
            else rng.standard_normal(var.shape, np.float32) * 0.02
        )
        var.set_value(value.astype(np_dtype(dtype)))
        del value
    out.mkdir(parents=True)
    save_params(out, state)
    (out / "model.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    Tokenizer.train([t for texts in sample_texts().values() for t in texts], vocab_size=512).save(out)
    return sum(var.get_value().nbytes for _, var in nnx.to_flat_state(state))


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _peak_rss() -> int:
    return next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmHWM:")
    )


def _child(model: str, mesh: str, dtype: str) -> None:
    """What `mellama-jax generate --model M --mesh X --dtype D` does (the same backend), printing the peak
    resident memory once the model is loaded and laid out for decoding, and again after 8 tokens (ids only: the
    random model's ids run past the small tokenizer's pieces)."""
    backend = JaxBackend(model, mesh=mesh if mesh != "none" else None, dtype=dtype)
    loaded = _peak_rss()
    backend.model.generate([backend.tokenizer.encode("Metformin is", bos=True)], 8, None)
    print(json.dumps({"loaded_peak_rss_bytes": loaded, "peak_rss_bytes": _peak_rss()}))


def bench_load(r: LoadBenchRequest) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={r.devices}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "params"
        size = write_checkpoint(r.model, r.layers, "bfloat16", ckpt)
        on_disk = _folder_bytes(ckpt)
        goal = 1.3 * size + 1.2 * GiB
        for mesh in r.meshes:
            for dtype in r.dtypes:
                out = subprocess.run(
                    [sys.executable, "-m", "mellama_jax.bench.load", str(ckpt), mesh, dtype],
                    env=env,
                    capture_output=True,
                    text=True,
                )
                if out.returncode:
                    rows.append(
                        {
                            "mesh": mesh,
                            "dtype": dtype,  # a child killed for memory leaves no stderr
                            "error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1],
                        }
                    )
                    continue
                got = json.loads(out.stdout.strip().splitlines()[-1])
                loaded, peak = got["loaded_peak_rss_bytes"], got["peak_rss_bytes"]
                rows.append(
                    {
                        "mesh": mesh,
                        "dtype": dtype,
                        "loaded_peak_rss_gib": loaded / GiB,
                        "loaded_ratio": loaded / size,
                        "loaded_meets_goal": loaded <= goal,
                        "peak_rss_gib": peak / GiB,
                        "ratio": peak / size,
                        "meets_goal": peak <= goal,
                    }
                )
    return {
        "model": r.model,
        "layers": r.layers,
        "devices": r.devices,
        "model_gib": size / GiB,
        "checkpoint_on_disk_gib": on_disk / GiB,
        "goal_gib": goal / GiB,
        "rows": rows,
    }


if __name__ == "__main__":
    _child(*sys.argv[1:])
