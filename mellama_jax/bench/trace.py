"""`bench trace`: where a profiled step's device time goes, from the Perfetto trace that `bench mesh --profile`
writes: kernel time per step by category (matmuls, attention, copies, the rest) and the top kernels."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

# kernel-name fragments -> category (first match wins; names as cuBLAS, cuDNN and XLA's emitters print them)
CATEGORIES = (
    ("attention", ("sdpa", "flash", "fmha", "cudnn")),
    ("matmul (fp32/tf32)", ("f32f32_tf32", "sgemm", "_f32_")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "dot")),
    ("copy", ("memcpy", "memset", "copy", "dynamic_update_slice")),
)


def category(kernel: str) -> str:
    name = kernel.lower()
    for label, fragments in CATEGORIES:
        if any(f in name for f in fragments):
            return label
    return "elementwise and reductions"


def summarize(trace: str | Path, steps: int = 2, top: int = 15) -> dict:
    """Device kernels of a trace of `steps` steps (events of processes named /device:*), per step, in ms."""
    opener = gzip.open if str(trace).endswith(".gz") else open
    with opener(trace, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    devices = {
        e["pid"]
        for e in events
        if e.get("ph") == "M"
        and e.get("name") == "process_name"
        and e.get("args", {}).get("name", "").startswith("/device:")
    }
    kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in devices]
    if not kernels:
        raise ValueError(f"{trace}: no device kernels in this trace (a CPU run records none)")
    per_kernel, calls = Counter(), Counter()
    for e in kernels:
        per_kernel[e["name"]] += e["dur"] / 1e3 / steps
        calls[e["name"]] += 1
    per_category = Counter()
    for name, ms in per_kernel.items():
        per_category[category(name)] += ms
    total = sum(per_kernel.values())
    span = (max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)) / 1e3 / steps
    return {
        "trace": str(trace),
        "kernel_ms_per_step": total,
        "span_ms_per_step": span,
        "categories": {k: {"ms": v, "share": v / total} for k, v in per_category.most_common()},
        "top": [
            {"kernel": k, "ms": v, "calls_per_step": calls[k] / steps, "category": category(k)}
            for k, v in per_kernel.most_common(top)
        ],
    }


def markdown(summary: dict) -> str:
    lines = [
        f"kernels {summary['kernel_ms_per_step']:.1f} ms per step (span {summary['span_ms_per_step']:.1f} ms)",
        "",
        "| category | ms/step | share |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v['ms']:.1f} | {v['share'] * 100:.0f}% |" for k, v in summary["categories"].items()]
    return "\n".join(lines)
