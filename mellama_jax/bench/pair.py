"""`bench pair`: variants of one train step on one device, timed in interleaved rounds (paired)."""

from __future__ import annotations

import dataclasses
import statistics

import jax

from mellama_jax.bench.timing import compile_step, cpu_peak_probe, one_device, time_steps
from mellama_jax.options import NON_NEGATIVE, POSITIVE, option, overrides, word_list


@dataclasses.dataclass(frozen=True)
class PairBenchRequest:
    """One `bench pair` run: what `mellama-jax bench pair` parses, and what `bench_pair` takes."""

    model: str = option("bench-60m")  # a model preset
    seq: int = option(256, type=POSITIVE)
    batch: int = option(4, type=POSITIVE)
    # config overrides per variant; () is the config as it is
    variants: tuple[tuple[str, ...], ...] = option(
        (),
        'space-separated config overrides of one variant ("" for the config as it is); give two or more, the '
        "first is the reference",
        flag="--variant",
        type=word_list,
        append=True,
    )
    rounds: int = option(10, "timed steps of each variant, interleaved", type=POSITIVE)
    warmup: int = option(3, type=NON_NEGATIVE)
    dtype: str = option("float32")
    overrides: tuple[str, ...] = overrides("config overrides for every variant, e.g. train.mode=lora")


def bench_pair(r: PairBenchRequest) -> dict:
    """Variants of one train step (one device), compiled side by side and timed in interleaved rounds (one step
    of each per round), so that a drift of the machine's speed falls on all of them alike: each variant's median
    step, its MFU (on a CPU against the matmul rate measured beside each step) and its speed relative to the
    first variant's (the ratio of medians)."""
    if len(r.variants) < 2:
        raise ValueError(f"bench pair needs two or more --variant options to compare, got {len(r.variants)}")
    common = one_device(r.model, r.seq, r.batch, r.dtype) + list(r.overrides)
    steps = [compile_step(common + list(v), devices=[jax.devices()[0]]) for v in r.variants]
    states = [s.state for s in steps]
    for _ in range(r.warmup):
        states = [s(state) for s, state in zip(steps, states)]
    probe = cpu_peak_probe()
    times, rates = [[] for _ in steps], [[] for _ in steps]
    for _ in range(r.rounds):
        for i, s in enumerate(steps):
            (t,), states[i], rate = time_steps(s, states[i], 0, 1, beside=probe)
            times[i].append(t)
            rates[i] += rate
    rows = []
    for v, s, ts, rs in zip(r.variants, steps, times, rates):
        median = statistics.median(ts)
        mfu = s.peak_and_mfu(ts, rs)[1]
        rows.append(
            {
                "overrides": list(v),
                "compile_s": s.compile_s,
                "step_s_median": median,
                "step_s_all": ts,
                "tokens_per_s": r.batch * r.seq / median,
                "mfu": mfu,
                "peak_tflops_beside_steps": rs,
                "speed_vs_first": statistics.median(times[0]) / median,
            }
        )
    return {
        "benchmark": "pair",
        "model": r.model,
        "seq": r.seq,
        "batch": r.batch,
        "dtype": r.dtype,
        "overrides": list(r.overrides),
        "device": jax.devices()[0].device_kind,
        "rounds": r.rounds,
        "rows": rows,
    }
