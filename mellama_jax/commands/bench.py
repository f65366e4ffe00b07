"""bench tokenize, mesh, pair, trace, attention, baseline, convert, memory, decode, load: JSON on stdout (and a
markdown table first where one reads better)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mellama_jax.bench import trace as trace_summary
from mellama_jax.bench.attention import AttentionBenchRequest, bench_attention
from mellama_jax.bench.baseline import BaselineBenchRequest, bench_baseline
from mellama_jax.bench.convert import bench_convert
from mellama_jax.bench.decode import DecodeBenchRequest, bench_decode
from mellama_jax.bench.load import LoadBenchRequest, bench_load
from mellama_jax.bench.memory import MemoryBenchRequest, bench_memory_layouts
from mellama_jax.bench.mesh import MeshBenchRequest, bench_mesh, markdown
from mellama_jax.bench.pair import PairBenchRequest, bench_pair
from mellama_jax.bench.tokenize import TokenizeBenchRequest, bench_tokenize
from mellama_jax.commands.printing import all_failed, json_command, print_json
from mellama_jax.options import POSITIVE, command, option

tokenize = json_command(TokenizeBenchRequest, bench_tokenize)


@command(MeshBenchRequest)
def mesh(r: MeshBenchRequest) -> int:
    result = bench_mesh(r)
    print(markdown(result))
    print_json(result)
    return all_failed(result["layouts"])


@command(PairBenchRequest)
def pair(r: PairBenchRequest) -> int:
    result = bench_pair(r)
    for row in result["rows"]:
        mfu = f", MFU {row['mfu']:.1%}" if row["mfu"] is not None else ""
        print(
            f"{' '.join(row['overrides']) or '(as configured)'}: {row['step_s_median']:.3f} s a step{mfu}, "
            f"{row['speed_vs_first']:.3f}x the first"
        )
    return print_json(result)


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    trace: str | Path = option(help="trace.json.gz written by bench mesh --profile", positional=True)
    steps: int = option(2, "steps the trace holds (bench mesh --profile: 2)", type=POSITIVE)
    top: int = option(15, type=POSITIVE)


@command(TraceRequest)
def trace(r: TraceRequest) -> int:
    summary = trace_summary.summarize(r.trace, r.steps, r.top)
    print(trace_summary.markdown(summary))
    return print_json(summary)


attention = json_command(AttentionBenchRequest, bench_attention)


baseline = json_command(BaselineBenchRequest, bench_baseline)


@dataclasses.dataclass(frozen=True)
class ConvertBenchRequest:
    layers: int = option(2, "layers of LLaMA2-70B's width (2: ~4.4 GB in bf16)", type=POSITIVE)
    workdir: str | None = option(None, "where to put the temporary checkpoints")


convert = json_command(ConvertBenchRequest, lambda r: bench_convert(r.layers, r.workdir))


@command(MemoryBenchRequest)
def memory(r: MemoryBenchRequest) -> int:
    result = bench_memory_layouts(r)
    print("| layout | planned GiB (XLA, all devices) | measured GiB (RSS growth) | measured / planned |")
    print("|---|---|---|---|")
    for row in result["layouts"]:
        if "error" in row:
            print(f"| {row['layout']} | error: {row['error'][:80]} | | |")
        else:
            print(
                f"| {row['layout']} | {row['planned_total_bytes'] / 2**30:.2f} | "
                f"{row['measured_rss_growth_bytes'] / 2**30:.2f} | {row['ratio_measured_to_planned']:.3f} |"
            )
    return print_json(result)


decode = json_command(DecodeBenchRequest, bench_decode)


load = json_command(LoadBenchRequest, bench_load)
