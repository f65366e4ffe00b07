"""`bench mesh` and `bench baseline`: real train steps per mesh layout, and the same model and batch in
transformers + torch (and PEFT for LoRA) in the same run, so the ratio is measured side by side."""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np


def _time_steps(run_step, carry, warmup: int, steps: int, beside=None) -> tuple[list[float], object, list]:
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
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": np.broadcast_to(np.arange(T), (B, T)),
            "segment_ids": np.ones((B, T)), "loss_weights": np.ones((B, T))}


def _profile(run, carry, compiled, out_dir: str | Path, steps: int = 2) -> None:
    """A device trace of `steps` more steps (Perfetto JSON: `bench trace` summarises it) and the optimized HLO,
    which maps kernel names back to the model's operations."""
    import gzip
    import shutil
    import tempfile

    import jax

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
        import jax

        with jax.set_mesh(self.trainer.mesh):
            state, metrics = self.compiled(state, self.frozen, self.batch)
        metrics["loss"].block_until_ready()
        return state

    def mfu(self, seconds: float, peak_per_device: float) -> float:
        from mellama_jax.train import flops

        cfg, n = self.cfg, self.trainer.mesh.size
        B, T = cfg.train.batch_size, cfg.train.seq_len
        return flops.mfu(cfg.model, T, B * T / seconds, peak_per_device * 1e12, n, cfg.adapters)

    def peak_and_mfu(self, times: list[float], rates: list[float]) -> tuple[float, float | None]:
        """(peak TFLOP/s per device, MFU) of timed steps: with the matmul rates measured beside them (a CPU), the
        median rate and the median of each step's MFU against its own rate; else the device's peak and the
        median step's MFU against it (None for an unknown peak)."""
        from mellama_jax.train import flops

        n = self.trainer.mesh.size
        if rates:
            return statistics.median(rates) / n, statistics.median(self.mfu(t, r / n) for t, r in zip(times, rates))
        peak = flops.peak_tflops_per_device(n)
        return peak, self.mfu(statistics.median(times), peak) if peak else None


def _compile_step(overrides: list[str], seed: int = 0, devices: list | None = None, config=None) -> _Step:
    import jax

    from mellama_jax.config import load_config
    from mellama_jax.sharding import make_mesh
    from mellama_jax.train.step import compile_ahead, plan_trainer

    cfg = load_config(config, ["train.steps=1000"] + list(overrides))
    trainer, init = plan_trainer(cfg, make_mesh(cfg.mesh, devices))
    with jax.set_mesh(trainer.mesh):
        state, frozen = init()
    batch = trainer.shard_batch(synthetic_batch(cfg, seed))
    start = time.perf_counter()
    compiled = compile_ahead(trainer, init)
    return _Step(cfg, trainer, compiled, state, frozen, batch, time.perf_counter() - start)


def _cpu_peak_probe():
    """On a CPU, a callable measuring the matmul rate now (the better of two probes), else None: steps are
    compared with the rate measured right after each, as a shared VM's rate drifts by 10-15% over seconds."""
    import jax

    from mellama_jax.train import flops

    if jax.default_backend() != "cpu":
        return None
    probe = flops.matmul_probe()
    return lambda: max(probe(), probe())


def jax_step_timing(overrides: list[str], warmup: int = 2, steps: int = 5, seed: int = 0,
                    devices: list | None = None, profile_dir: str | Path | None = None, config=None) -> dict:
    """`config` (a recipe YAML, default the built-in defaults) with `overrides`, timed on `devices`."""
    import jax

    from mellama_jax.train import flops

    step = _compile_step(overrides, seed, devices, config)
    cfg, n = step.cfg, step.trainer.mesh.size
    B, T = cfg.train.batch_size, cfg.train.seq_len
    # Each step donates the state it is given, so the timed calls thread it through. On a CPU the peak is the
    # matmul rate measured beside each step, and the MFU the median of the steps' ratios to theirs.
    times, state, rates = _time_steps(step, step.state, warmup, steps, beside=_cpu_peak_probe())
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
    return {"mesh": dict(step.trainer.mesh.shape), "compile_s": step.compile_s, "step_s_median": median,
            "step_s_all": times, "tokens_per_s": tokens_per_s, "tokens_per_s_per_device": tokens_per_s / n,
            "model_tflops_per_device": tflops, "peak_tflops_per_device": peak,
            "mfu": mfu, "peak_tflops_beside_steps": rates,
            "xla_bytes_per_device": mem.argument_size_in_bytes + mem.temp_size_in_bytes,
            "device_peak_bytes": device_peak}


def _one_device(model: str, seq: int, batch: int, dtype: str) -> list[str]:
    """Config overrides for one step of `model` on one device: what `bench baseline` and `bench pair` time."""
    return [f"model={model}", f"train.seq_len={seq}", f"train.batch_size={batch}", f"model.dtype={dtype}",
            "mesh.ici={data: 1, fsdp: 1, tensor: 1}"]


@dataclasses.dataclass(frozen=True)
class PairBenchRequest:
    """One `bench pair` run: what `mellama-jax bench pair` parses, and what `bench_pair` takes."""

    model: str  # a model preset
    seq: int
    batch: int
    variants: tuple[tuple[str, ...], ...]  # config overrides per variant; () is the config as it is
    rounds: int = 10  # timed steps of each variant, interleaved
    warmup: int = 3
    dtype: str = "float32"
    overrides: tuple[str, ...] = ()  # for every variant


def bench_pair(r: PairBenchRequest) -> dict:
    """Variants of one train step (one device), compiled side by side and timed in interleaved rounds (one step
    of each per round), so that a drift of the machine's speed falls on all of them alike: each variant's median
    step, its MFU (on a CPU against the matmul rate measured beside each step) and its speed relative to the
    first variant's (the ratio of medians)."""
    import jax

    if len(r.variants) < 2:
        raise ValueError(f"bench pair needs two or more --variant options to compare, got {len(r.variants)}")
    common = _one_device(r.model, r.seq, r.batch, r.dtype) + list(r.overrides)
    steps = [_compile_step(common + list(v), devices=[jax.devices()[0]]) for v in r.variants]
    states = [s.state for s in steps]
    for _ in range(r.warmup):
        states = [s(state) for s, state in zip(steps, states)]
    probe = _cpu_peak_probe()
    times, rates = [[] for _ in steps], [[] for _ in steps]
    for _ in range(r.rounds):
        for i, s in enumerate(steps):
            (t,), states[i], rate = _time_steps(s, states[i], 0, 1, beside=probe)
            times[i].append(t)
            rates[i] += rate
    rows = []
    for v, s, ts, rs in zip(r.variants, steps, times, rates):
        median = statistics.median(ts)
        mfu = s.peak_and_mfu(ts, rs)[1]
        rows.append({"overrides": list(v), "compile_s": s.compile_s, "step_s_median": median, "step_s_all": ts,
                     "tokens_per_s": r.batch * r.seq / median, "mfu": mfu, "peak_tflops_beside_steps": rs,
                     "speed_vs_first": statistics.median(times[0]) / median})
    return {"benchmark": "pair", "model": r.model, "seq": r.seq, "batch": r.batch, "dtype": r.dtype,
            "overrides": list(r.overrides), "device": jax.devices()[0].device_kind, "rounds": r.rounds,
            "rows": rows}


def torch_step_timing(cfg, warmup: int = 2, steps: int = 5, seed: int = 0, dtype: str = "float32") -> dict:
    """transformers' LlamaForCausalLM on the same shapes as our config `cfg` (AdamW). Full training keeps fp32
    weights; train.mode=lora puts PEFT adapters with cfg.lora's rank, alpha and targets on a base stored in
    lora.base_dtype. dtype bfloat16 runs under autocast (bf16 compute over fp32 weights, as our recipes do);
    model.remat other than none turns on gradient checkpointing."""
    import contextlib

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mellama_jax.convert.export import hf_config
    from mellama_jax.convert.peft import HF_TO_OURS

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    batch, seq, lora = cfg.train.batch_size, cfg.train.seq_len, cfg.train.mode == "lora"
    hf_cfg = LlamaConfig(**hf_config(cfg.model, "float32"))
    base_dtype = getattr(torch, cfg.lora.base_dtype) if lora else torch.float32
    with torch.device(device):  # initialised where it runs: a 7B-width CPU init would take longer than the steps
        model = LlamaForCausalLM(hf_cfg).to(base_dtype)
    if cfg.model.remat != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        from peft import LoraConfig, get_peft_model

        ours_to_hf = {v: k for k, v in HF_TO_OURS.items()}
        model = get_peft_model(model, LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                                                 target_modules=[ours_to_hf[t] for t in cfg.lora.targets]))
        for p in model.parameters():  # adapters train in fp32 over the bf16 base, as ours do
            if p.requires_grad:
                p.data = p.data.float()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, betas=(0.9, 0.95),
                            weight_decay=1e-5)
    ids = torch.randint(3, cfg.model.vocab_size, (batch, seq), device=device)
    autocast = (torch.autocast(device, dtype=torch.bfloat16) if dtype == "bfloat16"
                else contextlib.nullcontext())

    def run(_):
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    times, _, _ = _time_steps(run, None, warmup, steps)
    median = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"device": device, "threads": torch.get_num_threads(), "dtype": dtype, "step_s_median": median,
            "step_s_all": times, "tokens_per_s": batch * seq / median, "device_peak_bytes": peak,
            "gradient_checkpointing": cfg.model.remat != "none"}


@dataclasses.dataclass(frozen=True)
class MeshBenchRequest:
    """One `bench mesh` run: what `mellama-jax bench mesh` parses, and what `bench_mesh` takes."""

    model: str  # a model preset
    layouts: tuple[str, ...]  # ici layouts such as "fsdp=4,tensor=2", one row each
    seq: int
    batch: int
    remat: str
    dtype: str
    warmup: int  # untimed steps first (the first compiles)
    steps: int
    png: str | Path | None = None  # a bar chart of tokens/s per layout
    overrides: tuple[str, ...] = ()  # more config overrides, applied after the layout's
    profile: str | Path | None = None  # a folder; each layout's trace and HLO go to a subfolder named after it


def bench_mesh(r: MeshBenchRequest) -> dict:
    from mellama_jax.sharding import layout_overrides

    rows = []
    for layout in r.layouts:
        row_overrides = [f"model={r.model}", f"train.seq_len={r.seq}", f"train.batch_size={r.batch}",
                         f"model.remat={r.remat}", f"model.dtype={r.dtype}", *layout_overrides(layout), *r.overrides]
        try:
            where = Path(r.profile) / layout.replace("=", "").replace(",", "_") if r.profile else None
            rows.append(dict(layout=layout, **jax_step_timing(row_overrides, r.warmup, r.steps, profile_dir=where)))
        except Exception as e:
            rows.append({"layout": layout, "error": f"{type(e).__name__}: {e}"})
    import jax

    result = {"benchmark": "mesh", "model": r.model, "seq": r.seq, "batch": r.batch, "remat": r.remat,
              "dtype": r.dtype, "overrides": list(r.overrides), "device": jax.devices()[0].device_kind,
              "layouts": rows}
    if r.png:
        _bar_chart(result, Path(r.png))
    return result


def _bar_chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in result["layouts"] if "error" not in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([r["layout"] for r in ok], [r["tokens_per_s"] for r in ok])
    ax.set(ylabel="tokens/s", title=f"{result['model']}: train step throughput per layout")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(result: dict) -> str:
    lines = ["| layout | compile s | step s | tokens/s | tokens/s/device | TFLOP/s/device | MFU | XLA GiB/device |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["layouts"]:
        if "error" in r:
            lines.append(f"| {r['layout']} | error: {r['error'][:60]} | | | | | | |")
            continue
        lines.append(f"| {r['layout']} | {r['compile_s']:.1f} | {r['step_s_median']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{r['tokens_per_s_per_device']:.0f} | {r['model_tflops_per_device']:.3f} | "
                     f"{(r['mfu'] or 0) * 100:.1f}% | {r['xla_bytes_per_device'] / 2**30:.2f} |")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class BaselineBenchRequest:
    """One `bench baseline` run: what `mellama-jax bench baseline` parses, and what `bench_baseline` takes."""

    model: str  # a model preset
    seq: int
    batch: int
    lora_rank: int  # the lora row's rank (0: no lora row)
    warmup: int
    steps: int
    dtype: str = "float32"  # bfloat16: ours in bf16 compute, torch under autocast
    overrides: tuple[str, ...] = ()  # more config overrides, on both sides
    sides: str = "both"  # or "ours" or "torch" alone
    modes: tuple[str, ...] = ("full", "lora")  # the rows to run


def bench_baseline(r: BaselineBenchRequest) -> dict:
    """Ours (one device) and transformers (+ PEFT for lora) on the same model and batch. sides "ours" or
    "torch" runs one of them: on a GPU each needs its own process, as JAX keeps the memory it has used.
    The LoRA row's defaults (rank lora_rank, alpha 2 x rank, no dropout, fp32 base on q/k/v/o) yield to
    `overrides` such as lora.targets=[...] or lora.base_dtype=bfloat16, on both sides."""
    import jax

    from mellama_jax.config import load_config

    common = _one_device(r.model, r.seq, r.batch, r.dtype)
    lora = ["train.mode=lora", f"lora.rank={r.lora_rank}", f"lora.alpha={2 * r.lora_rank}", "lora.dropout=0.0",
            "lora.base_dtype=float32"]
    result = {"benchmark": "baseline", "model": r.model, "seq": r.seq, "batch": r.batch, "dtype": r.dtype,
              "overrides": list(r.overrides), "device": jax.devices()[0].device_kind}
    one = [jax.devices()[0]]  # one real device: the torch side is one process on the same cores
    rows = {"full": [], "lora": lora if r.lora_rank else None}
    for mode in r.modes:
        if rows.get(mode) is None:
            continue
        settings = common + rows[mode] + list(r.overrides)
        row = {}
        if r.sides in ("both", "ours"):
            row["ours"] = jax_step_timing(settings, r.warmup, r.steps, devices=one)
        if r.sides in ("both", "torch"):
            row["torch"] = torch_step_timing(load_config(None, ["train.steps=1"] + settings), r.warmup, r.steps,
                                             dtype=r.dtype)
        if len(row) == 2:
            row["speedup"] = row["ours"]["tokens_per_s"] / row["torch"]["tokens_per_s"]
        result[mode] = row
    return result
