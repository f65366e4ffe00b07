"""`mellama-jax plan`: compile the real train step ahead of time for a layout on a simulated device set, with
abstract shapes only (nothing allocated), and report XLA's per-device memory beside an analytical estimate.

`--target tpu` compiles for the abstract chips of a TPU topology instead (libtpu describes them on any host, as
MaxText's train_compile does), with the TPU compiler's per-chip memory against the chip's HBM, XLA's cost
analysis and the roofline step time it implies (plan/tpu.py).

Run it in a fresh process: it sets the number of simulated CPU devices before JAX starts its backend.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
from flax import nnx

from mellama_jax import sharding
from mellama_jax.config import ConfigError, Mode, load_config
from mellama_jax.model import init_abstract
from mellama_jax.options import POSITIVE, POSITIVE_NUMBER, layout_list, name_list, number, option, overrides
from mellama_jax.plan.tpu import chip_of, roofline_seconds, topology_devices
from mellama_jax.sharding import layout_overrides
from mellama_jax.train.flops import train_flops_per_token
from mellama_jax.train.step import compile_ahead, plan_trainer

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class PlanRequest:
    """One `plan` run: what `mellama-jax plan` parses, and what `plan` (simulated CPU devices), `plan_tpu` (--target
    tpu) and `search.search` (--search) take; each reads the fields marked for it and those unmarked."""

    config: str | Path | None = option(None, "a recipe YAML")  # default: the built-in defaults
    model: str | None = option(None, "model preset (overrides the config's)")
    overrides: tuple[str, ...] = overrides()
    # one row each
    layouts: tuple[str, ...] = option(
        (),
        '";"-separated ici layouts, e.g. "fsdp=8;fsdp=4,tensor=2" (default: the '
        "config's mesh; tpu: fsdp=-1, the whole slice)",
        type=layout_list,
    )
    # cpu: simulated devices; --search: all devices of the cluster
    devices: int | None = option(None, "simulated devices, e.g. 160", type=POSITIVE)
    # each GPU's memory; XLA's plan must fit the launcher's share of it
    memory_gib: float = option(80.0, "device memory to fit, GiB (default 80)", type=POSITIVE_NUMBER)
    topology: str | None = option(None, "tpu: CHIP:SHAPE as JAX names TPU topologies, e.g. v5p:4x4x4 (64 chips)")
    slices: int = option(1, "tpu: slices of --topology, data parallel across them (dcn)", type=POSITIVE)
    # GPUs are compiled for as simulated CPU devices; "tpu": the chips of `topology`, TPU compiler
    target: str = option(
        "cpu",
        "tpu: compile for the chips of --topology with the TPU compiler (needs the tpu extra)",
        choices=("cpu", "tpu"),
    )
    search: bool = option(False, "rank the layouts, accumulations and remat policies that fit (--devices, --gpu)")
    devices_per_host: int = option(8, "--search: devices per host (default 8)", type=POSITIVE)
    gpu: str = option("a100", "--search: the figures ranked on", choices=("a100", "h100"))
    tokens: float = option(
        129e9, "--search: the training budget in tokens, for days to the end (default 129e9)", type=POSITIVE_NUMBER
    )
    max_compiles: int = option(8, "--search: survivors compiled and ranked", type=POSITIVE)  # in candidate order
    remats: tuple[str, ...] = option(("full",), "--search: comma-separated remat policies", type=name_list)
    calibrate: int = option(
        0,
        "--search: run the best N that fit on this host's devices and compare (ranked on this host's measured figures)",
        type=number(int, 0),
    )
    json: bool = option(False, "--search: the result as JSON")


# The share of each GPU's memory that launch/slurm_gpu.sbatch lets XLA take (XLA_PYTHON_CLIENT_MEM_FRACTION; a test
# keeps the two equal). The rest holds the CUDA context, cuBLAS/cuDNN workspaces and the allocator's slack, so a
# layout fits a GPU when XLA's plan fits this share, not the whole card.
GPU_MEMORY_FRACTION = 0.92


def gpu_share_bytes(memory_gib: float) -> float:
    """What XLA may allocate on a GPU of `memory_gib` under our launcher."""
    return memory_gib * GiB * GPU_MEMORY_FRACTION


def simulate_devices(count: int) -> None:
    """`count` simulated CPU devices, set before JAX starts its backend."""
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # the backend is already up (e.g. inside tests): use it if it has the right size
        if jax.device_count() != count:
            raise


def _overrides(r: PlanRequest) -> list[str]:
    return list(r.overrides) + ([f"model.preset={r.model}"] if r.model else [])


def analytical(cfg) -> dict:
    """Per-device bytes by hand: sharded parameters, fp32 gradients and Adam moments, checkpointed activations."""
    mesh = sharding.make_mesh(cfg.mesh)
    abstract = nnx.state(init_abstract(cfg.model), nnx.Param)
    shardings = sharding.state_shardings(abstract, mesh, cfg.mesh.rules)
    params = sharding.bytes_per_device(abstract, shardings)
    fp32 = sharding.bytes_per_device(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, "float32"), abstract), shardings
    )
    batch_ways = math.prod(mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape)
    m = cfg.model
    micro = cfg.train.batch_size // cfg.train.grad_accum // batch_ways  # sequences per device per microbatch
    tokens = micro * cfg.train.seq_len
    act = 2 if m.dtype == "bfloat16" else 4
    tensor = mesh.shape.get("tensor", 1)
    residuals = m.num_layers * tokens * m.hidden_size * act  # layer inputs kept for the backward pass
    layer = (
        tokens * (6 * m.hidden_size + 3 * m.intermediate_size // tensor) * 4
        + 3 * micro * (m.num_heads // tensor) * cfg.train.seq_len**2 * 4
    )  # recomputed layer; fp32 scores
    logits = tokens * m.vocab_size // tensor * 4 * 2
    # FSDP gathers a layer's weights whole (fp32) and produces its gradient whole before reduce-scattering;
    # count two layers in flight (compute + prefetch) and one layer gradient.
    per_layer = (
        (sum(math.prod(x.shape) for x in jax.tree.leaves(abstract)) - 2 * m.vocab_size * m.hidden_size)
        / m.num_layers
        / tensor
        * 4
    )
    return {
        "params": params,
        "optimizer": 2 * fp32 if cfg.train.mode != Mode.LORA else 0,
        "gradients": fp32,
        "activations": residuals + layer + logits,
        "gathered_layers": int(3 * per_layer),
    }


def _compile(cfg, devices=None):
    """The train step lowered with abstract inputs and compiled (for `devices`, default JAX's): (compiled, mesh)."""
    trainer, init = plan_trainer(cfg, sharding.make_mesh(cfg.mesh, devices))
    return compile_ahead(trainer, init), trainer.mesh


def _cost(compiled) -> dict:
    """XLA's cost analysis of the compiled step, per device: FLOPs and bytes moved to and from memory."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def plan_layout(cfg, devices=None) -> dict:
    start = time.perf_counter()
    compiled, mesh = _compile(cfg, devices)
    m = compiled.memory_analysis()
    xla = {
        "arguments": m.argument_size_in_bytes,
        "temporaries": m.temp_size_in_bytes,
        "outputs_not_aliased": max(0, m.output_size_in_bytes - m.alias_size_in_bytes),
    }
    xla["total"] = sum(xla.values())
    row = {
        "mesh": dict(mesh.shape),
        "compile_s": time.perf_counter() - start,
        "xla_bytes": xla,
        # activations a remat policy offloads, in the host's memory (TPU compiles; XLA's CPU backend keeps them on
        # the device, so a CPU plan counts them in the device's temporaries)
        "xla_host_bytes": m.host_temp_size_in_bytes,
        "cost": _cost(compiled),
    }
    if devices is not None:  # Pallas kernels in the program (splash attention), as the TPU compiler lowered them
        row["mosaic_calls"] = compiled.as_text().count('custom_call_target="tpu_custom_call"')
    else:
        row["analytical_bytes"] = analytical(cfg)
    return row


def plan(r: PlanRequest) -> dict:

    if not r.devices:
        raise ConfigError("plan needs --devices (simulated CPU devices), or --target tpu --topology ...")
    simulate_devices(r.devices)
    rows = []
    for layout in r.layouts or [""]:
        extra = layout_overrides(layout) if layout else []
        cfg = load_config(r.config, _overrides(r) + extra)
        try:
            row = plan_layout(cfg)
        except Exception as e:  # a layout that cannot be built is a result, not a crash
            row = {"mesh": layout or "config", "error": f"{type(e).__name__}: {e}"}
        row["layout"] = layout or "config"
        if "xla_bytes" in row:
            row["fits"] = row["xla_bytes"]["total"] <= gpu_share_bytes(r.memory_gib)
        rows.append(row)
    return {
        "model": cfg.model.name,
        "devices": r.devices,
        "device_memory_gib": r.memory_gib,
        "batch": [cfg.train.batch_size, cfg.train.seq_len, cfg.train.grad_accum],
        "layouts": rows,
    }


def _step_cost(cfg, small: tuple, devices) -> dict:
    """The whole step's cost from XLA's cost analysis, which counts the body of a loop once (the scanned layers
    as one, and the stacked weights they slice whole). So: the same step with one and with two layers unrolled,
    whose difference is one layer's cost, extrapolated to num_layers; grad_accum multiplies the lot (the optimizer
    update, run once per step, is then overcounted: a few percent of the bytes)."""
    one, two = (_cost(_compile(c, devices)[0]) for c in small)
    layers = cfg.model.num_layers
    return {k: (one[k] + (layers - 1) * (two[k] - one[k])) * cfg.train.grad_accum for k in one}


def _tpu_row(cfg, small, devices, chip) -> dict:
    """One layout compiled for TPU chips: memory against the chip's HBM, cost analysis, roofline and ideal times."""
    row = plan_layout(cfg, devices)
    row["cost_as_compiled"], row["cost"] = row["cost"], _step_cost(cfg, small, devices)
    batch_ways = math.prod(row["mesh"][a] for a in ("data", "fsdp") if a in row["mesh"])
    row["per_chip_batch"] = cfg.train.batch_size // cfg.train.grad_accum / batch_ways
    row["fits"] = row["xla_bytes"]["total"] <= chip.hbm_gib * GiB
    row["roofline_s"] = roofline_seconds(row["cost"]["flops"], row["cost"]["bytes_accessed"], chip)
    # the step at 100% MFU: model FLOPs (6 per trained weight per token, 4 per frozen one, plus attention) over
    # the chips at peak
    tokens = cfg.train.batch_size * cfg.train.seq_len
    row["ideal_s"] = (
        train_flops_per_token(cfg.model, cfg.train.seq_len, cfg.adapters)
        * tokens
        / len(devices)
        / (chip.bf16_tflops * 1e12)
    )
    return row


def plan_tpu(r: PlanRequest) -> dict:
    """Each ici layout (default: FSDP over the whole slice) on `r.slices` slices of `r.topology`, data parallel
    across slices (dcn)."""
    if not r.topology:
        raise ConfigError("plan --target tpu needs --topology, e.g. v5p:4x4x4")
    name, chip = chip_of(r.topology)
    devices = topology_devices(r.topology, r.slices)
    rows = []
    for layout in r.layouts or ["fsdp=-1"]:
        overrides = _overrides(r) + layout_overrides(layout, r.slices)
        cfg = load_config(r.config, overrides)
        small = tuple(
            load_config(r.config, overrides + [f"model.num_layers={n}", f"model.scan_unroll={n}"]) for n in (1, 2)
        )
        try:
            row = _tpu_row(cfg, small, devices, chip)
        except Exception as e:  # a layout that cannot be built or does not compile is a result, not a crash
            row = {"mesh": layout, "error": f"{type(e).__name__}: {str(e)[:2000]}"}
        rows.append(dict(row, layout=layout))
    return {
        "model": cfg.model.name,
        "topology": r.topology,
        "slices": r.slices,
        "chip": name,
        "devices": len(devices),
        "hbm_gib": chip.hbm_gib,
        "attention": cfg.model.attention,
        "batch": [cfg.train.batch_size, cfg.train.seq_len, cfg.train.grad_accum],
        "layouts": rows,
    }


def _table(heading: str, columns: list[str], rows: list[dict], cells) -> str:
    """A heading, then one markdown row per layout: its cells, or for a layout that failed, its error under
    "fits"."""
    lines = [heading, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        if "error" in r:
            values = ["-"] * len(columns)
            values[columns.index("fits")] = f"no: {r['error'][:100]}"
        else:
            values = cells(r)
        lines.append("| " + " | ".join([str(r["layout"])] + values[1:]) + " |")
    return "\n".join(lines)


def _fits(r: dict) -> str:
    return "yes" if r["fits"] else "NO"


def markdown(result: dict) -> str:
    heading = (
        f"{result['model']} on {result['devices']} devices, batch x seq x accum = "
        f"{' x '.join(map(str, result['batch']))}, device memory {result['device_memory_gib']} GiB, "
        f"of which XLA may use {GPU_MEMORY_FRACTION:.0%} (launch/slurm_gpu.sbatch)"
    )
    columns = ["layout", "mesh", "XLA args GiB", "XLA temp GiB", "XLA total GiB", "estimate GiB", "fits", "compile s"]

    def cells(r):
        x, a = r["xla_bytes"], r["analytical_bytes"]
        return [
            "",
            str(r["mesh"]),
            f"{x['arguments'] / GiB:.2f}",
            f"{x['temporaries'] / GiB:.2f}",
            f"{x['total'] / GiB:.2f}",
            f"{sum(a.values()) / GiB:.2f}",
            _fits(r),
            f"{r['compile_s']:.1f}",
        ]

    return _table(heading, columns, result["layouts"], cells)


def markdown_tpu(result: dict) -> str:
    heading = (
        f"{result['model']} on {result['slices']} x {result['topology']} ({result['devices']} "
        f"{result['chip']} chips, {result['hbm_gib']} GiB HBM each), batch x seq x accum = "
        f"{' x '.join(map(str, result['batch']))}, attention {result['attention']}"
    )
    columns = [
        "layout",
        "mesh",
        "per-chip batch",
        "per-chip GiB (args + temp)",
        "host GiB / chip",
        "fits",
        "compile s",
        "TFLOP / chip",
        "GiB moved / chip",
        "roofline step s",
        "ideal step s",
    ]

    def cells(r):
        x, c = r["xla_bytes"], r["cost"]
        return [
            "",
            str(r["mesh"]),
            f"{r['per_chip_batch']:g}",
            f"{x['total'] / GiB:.2f} ({x['arguments'] / GiB:.2f} + {x['temporaries'] / GiB:.2f})",
            f"{r['xla_host_bytes'] / GiB:.2f}",
            _fits(r),
            f"{r['compile_s']:.0f}",
            f"{c['flops'] / 1e12:.1f}",
            f"{c['bytes_accessed'] / GiB:.1f}",
            f"{r['roofline_s']:.2f}",
            f"{r['ideal_s']:.2f}",
        ]

    return _table(heading, columns, result["layouts"], cells)


def report(result: dict, table) -> str:
    """The markdown table, then the JSON."""
    return table(result) + "\n\n" + json.dumps(result, indent=1, default=str)
