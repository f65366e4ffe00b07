"""`bench mesh`: real train steps per mesh layout: throughput, MFU and memory."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from mellama_jax.bench.timing import LayoutsBench, jax_step_timing
from mellama_jax.options import NON_NEGATIVE, POSITIVE, layout_list, option, overrides
from mellama_jax.sharding import layout_overrides


@dataclasses.dataclass(frozen=True)
class MeshBenchRequest(LayoutsBench):
    """One `bench mesh` run: what `mellama-jax bench mesh` parses, and what `bench_mesh` takes."""

    layouts: tuple[str, ...] = option(
        ("data=8", "fsdp=8", "fsdp=4,tensor=2"), '";"-separated ici layouts', type=layout_list
    )
    remat: str = option("none")
    dtype: str = option("float32")
    warmup: int = option(2, type=NON_NEGATIVE)  # untimed steps first (the first compiles)
    steps: int = option(5, type=POSITIVE)
    png: str | Path | None = option(None, "bar chart output path")
    # applied after the layout's
    overrides: tuple[str, ...] = overrides("more config overrides, e.g. model.num_layers=8 model.attention=cudnn")
    # each layout's trace and HLO go to a subfolder named after it
    profile: str | Path | None = option(None, "folder for a device trace and the optimized HLO of each layout")
    devices: int = option(0, "simulated CPU devices (0: what is there)", type=NON_NEGATIVE)


def bench_mesh(r: MeshBenchRequest) -> dict:
    if r.devices:  # simulated CPU devices: set before JAX starts its backend
        jax.config.update("jax_num_cpu_devices", r.devices)
    rows = []
    for layout in r.layouts:
        row_overrides = [
            f"model={r.model}",
            f"train.seq_len={r.seq}",
            f"train.batch_size={r.batch}",
            f"model.remat={r.remat}",
            f"model.dtype={r.dtype}",
            *layout_overrides(layout),
            *r.overrides,
        ]
        try:
            where = Path(r.profile) / layout.replace("=", "").replace(",", "_") if r.profile else None
            rows.append(dict(layout=layout, **jax_step_timing(row_overrides, r.warmup, r.steps, profile_dir=where)))
        except Exception as e:
            rows.append({"layout": layout, "error": f"{type(e).__name__}: {e}"})
    result = {
        "benchmark": "mesh",
        "model": r.model,
        "seq": r.seq,
        "batch": r.batch,
        "remat": r.remat,
        "dtype": r.dtype,
        "overrides": list(r.overrides),
        "device": jax.devices()[0].device_kind,
        "layouts": rows,
    }
    if r.png:
        _bar_chart(result, Path(r.png))
    return result


def _bar_chart(result: dict, path: Path) -> None:
    import matplotlib  # as plot.py: only when a chart is asked for

    matplotlib.use("Agg")  # before pyplot: no display
    import matplotlib.pyplot as plt

    ok = [r for r in result["layouts"] if "error" not in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([r["layout"] for r in ok], [r["tokens_per_s"] for r in ok])
    ax.set(ylabel="tokens/s", title=f"{result['model']}: train step throughput per layout")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(result: dict) -> str:
    lines = [
        "| layout | compile s | step s | tokens/s | tokens/s/device | TFLOP/s/device | MFU | XLA GiB/device |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["layouts"]:
        if "error" in r:
            lines.append(f"| {r['layout']} | error: {r['error'][:60]} | | | | | | |")
            continue
        lines.append(
            f"| {r['layout']} | {r['compile_s']:.1f} | {r['step_s_median']:.3f} | {r['tokens_per_s']:.0f} | "
            f"{r['tokens_per_s_per_device']:.0f} | {r['model_tflops_per_device']:.3f} | "
            f"{(r['mfu'] or 0) * 100:.1f}% | {r['xla_bytes_per_device'] / 2**30:.2f} |"
        )
    return "\n".join(lines)
