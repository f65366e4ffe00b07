"""Benchmark commands run and report consistent numbers (speed goals live in docs/benchmarks.md, not here)."""

import statistics

import numpy as np
import pytest

from mellama_jax.bench.baseline import BaselineBenchRequest, bench_baseline
from mellama_jax.bench.mesh import MeshBenchRequest, bench_mesh, markdown
from mellama_jax.config import load_model_preset
from mellama_jax.train import flops


@pytest.mark.slow  # 14 s; bench pair and bench baseline's tests time the same steps (make test-all runs it)
def test_bench_mesh_reports_each_layout(tmp_path):
    result = bench_mesh(
        MeshBenchRequest(
            "tiny-gqa",
            ("data=8", "fsdp=4,tensor=2", "tensor=8"),
            seq=32,
            batch=8,
            remat="none",
            dtype="float32",
            warmup=1,
            steps=2,
            png=tmp_path / "mesh.png",
        )
    )
    ok, ok2, bad = result["layouts"]
    assert "does not divide" in bad["error"]
    for r in (ok, ok2):
        assert r["tokens_per_s"] == pytest.approx(8 * 32 / r["step_s_median"])
        per_token = flops.train_flops_per_token(load_model_preset("tiny-gqa"), 32)
        assert r["model_tflops_per_device"] == pytest.approx(per_token * r["tokens_per_s"] / 8 / 1e12)
        assert 0 < r["mfu"] < 1 and r["xla_bytes_per_device"] > 0
        # on CPU each step is paired with the matmul rate (whole machine) measured right after it
        rates = r["peak_tflops_beside_steps"]
        assert len(rates) == len(r["step_s_all"]) == 2
        assert r["peak_tflops_per_device"] == pytest.approx(statistics.median(rates) / 8)
        assert r["mfu"] == pytest.approx(
            statistics.median(per_token * 8 * 32 / t / (rate * 1e12) for t, rate in zip(r["step_s_all"], rates))
        )
    assert (tmp_path / "mesh.png").stat().st_size > 1000
    assert markdown(result).count("\n") == 4


@pytest.mark.slow  # 29 s; `bench pair` tests time the same steps (make test-all runs it)
def test_bench_baseline_runs_both_sides():
    result = bench_baseline(BaselineBenchRequest("tiny", seq=32, batch=2, lora_rank=4, warmup=1, steps=2))
    for part in ("full", "lora"):
        assert result[part]["speedup"] > 0
    assert result["full"]["torch"]["tokens_per_s"] > 0


def test_bench_pair_interleaves_variants(capsys):
    """Two variants of one step (scanned and unrolled layers), one timed step of each per round: speeds relative
    to the first from the medians, MFU from each step against the matmul rate measured beside it."""
    from mellama_jax.bench.pair import PairBenchRequest, bench_pair
    from mellama_jax.cli import main

    result = bench_pair(
        PairBenchRequest("tiny", seq=32, batch=2, variants=((), ("model.scan_layers=false",)), rounds=3, warmup=1)
    )
    first, second = result["rows"]
    assert second["overrides"] == ["model.scan_layers=false"] and first["speed_vs_first"] == 1.0
    assert second["speed_vs_first"] == pytest.approx(first["step_s_median"] / second["step_s_median"])
    per_token = flops.train_flops_per_token(load_model_preset("tiny"), 32)
    for row in (first, second):
        assert len(row["step_s_all"]) == len(row["peak_tflops_beside_steps"]) == 3
        assert row["mfu"] == pytest.approx(
            statistics.median(
                per_token * 64 / t / (rate * 1e12)
                for t, rate in zip(row["step_s_all"], row["peak_tflops_beside_steps"])
            )
        )
    assert main(["bench", "pair", "--variant", "model.scan_layers=false"]) == 2
    assert "two or more --variant" in capsys.readouterr().err


def test_bench_decode_compares_the_same_tokens():
    from mellama_jax.bench.decode import DecodeBenchRequest, bench_decode

    result = bench_decode(
        DecodeBenchRequest("tiny", batches=(1, 3), prompt_len=5, new_tokens=6, repeats=1, dtype="float32")
    )
    for row in result["rows"]:
        assert row["same_tokens"]  # both sides decoded the same greedy continuation
        assert row["ratio"] == pytest.approx(row["jax_tokens_per_s"] / row["hf_tokens_per_s"])


def test_bench_load_reports_each_layout_in_a_fresh_process():
    """`bench load` on a tiny width: every row ran (no error line) and its peaks are real process figures: at
    least the model, above the once-loaded peak by no more than the decode's own memory."""
    from mellama_jax.bench.load import GiB, LoadBenchRequest, bench_load

    result = bench_load(
        LoadBenchRequest("tiny", layers=1, meshes=("tensor=2", "none"), dtypes=("bfloat16",), devices=2)
    )
    assert [(r["mesh"], r["dtype"]) for r in result["rows"]] == [("tensor=2", "bfloat16"), ("none", "bfloat16")]
    for row in result["rows"]:
        assert "error" not in row, row
        assert row["loaded_peak_rss_gib"] * GiB > result["model_gib"] * GiB
        assert row["peak_rss_gib"] >= row["loaded_peak_rss_gib"]
        assert row["ratio"] == pytest.approx(row["peak_rss_gib"] / result["model_gib"])


@pytest.mark.slow
def test_planner_memory_matches_a_real_step():
    """XLA's ahead-of-time memory analysis (what `plan` reports) against the resident memory a real step takes
    on 8 simulated devices; within 15% (measured here: 1.04-1.05)."""
    from mellama_jax.bench.memory import MemoryBenchRequest, bench_memory_layouts

    result = bench_memory_layouts(MemoryBenchRequest("bench-60m", ("fsdp=8",), 256, 8))
    assert 0.85 < result["layouts"][0]["ratio_measured_to_planned"] < 1.15


@pytest.mark.slow  # ~20 s: a fresh process compiles and runs the step
def test_bench_memory_runs_a_recipe_as_the_planner_plans_it():
    """`bench memory --config RECIPE`: the worker process loads the recipe under the overrides, so its planned
    memory is the planner's for the same program (tiny-pretrain's fp32 tiny model at remat full)."""
    from mellama_jax.bench.memory import MemoryBenchRequest, bench_memory_layouts
    from mellama_jax.config import CONFIG_ROOT, load_config
    from mellama_jax.plan.layouts import plan_layout
    from mellama_jax.sharding import layout_overrides

    recipe = str(CONFIG_ROOT / "tiny-pretrain.yaml")
    extra = ("train.grad_accum=1", "model.remat=full")
    row = bench_memory_layouts(MemoryBenchRequest("tiny", ("fsdp=4,tensor=2",), 32, 16, extra, config=recipe))
    row = row["layouts"][0]
    assert "error" not in row, row
    cfg = load_config(
        recipe,
        [
            "train.steps=1000",
            "model=tiny",
            "train.seq_len=32",
            "train.batch_size=16",
            *layout_overrides("fsdp=4,tensor=2"),
            *extra,
        ],
    )
    assert row["planned_bytes_per_device"] == plan_layout(cfg)["xla_bytes"]


def test_bench_trace_sums_device_kernels_by_category(tmp_path):
    import gzip
    import json

    from mellama_jax.bench.trace import markdown, summarize

    def kernel(name, ts, dur, pid=1):
        return {"ph": "X", "pid": pid, "tid": 7, "ts": ts, "dur": dur, "name": name}

    events = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 9, "name": "process_name", "args": {"name": "/host:CPU"}},
        kernel("nvjet_sm90_tss_256x128", 0, 3000),
        kernel("gemm_fusion_dot_16", 3000, 1000),
        kernel("sm90_xmma_gemm_f32f32_tf32f32_f32_nt", 4000, 2000),
        kernel("cudnn_generated_fort_native_sdpa_sm90_flash_bprop", 6000, 1500),
        kernel("memcpy128", 7500, 500),
        kernel("loop_add_fusion_4", 8000, 2000),
        kernel("host work", 0, 99000, pid=9),
    ]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = summarize(path, steps=2)
    assert s["kernel_ms_per_step"] == pytest.approx(5.0) and s["span_ms_per_step"] == pytest.approx(5.0)
    ms = {k: v["ms"] for k, v in s["categories"].items()}
    assert ms == pytest.approx(
        {"matmul": 2.0, "matmul (fp32/tf32)": 1.0, "attention": 0.75, "copy": 0.25, "elementwise and reductions": 1.0}
    )
    assert s["top"][0]["kernel"] == "nvjet_sm90_tss_256x128" and "| matmul | 2.0 | 40% |" in markdown(s)
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events[1:2] + events[-1:]}, f)
    with pytest.raises(ValueError, match="no device kernels"):
        summarize(path)


@pytest.mark.parametrize("preset", ["llama2-7b", "llama2-70b"])
def test_matmul_weights_counted_are_the_models_kernels(preset):
    """The FLOPs formula's weights against the model itself: every projection kernel and the LM head of the
    abstract model (no memory), GQA included (70B: 8 KV heads of 64), embedding and norms excluded."""
    from flax import nnx

    from mellama_jax.model import init_abstract

    cfg = load_model_preset(preset)
    state = nnx.state(init_abstract(cfg), nnx.Param)
    kernels = sum(int(np.prod(v.shape)) for path, v in nnx.to_flat_state(state) if path[-1] == "kernel")
    assert flops.matmul_params(cfg) == kernels
    assert preset != "llama2-7b" or kernels == 6_738_415_616 - 32000 * 4096 - 65 * 4096  # Meta's 7B count
