"""The candidates a layout search ranks (the first part of `plan --search`): every way to lay a recipe's train step
over a cluster that the rule table can shard and that keeps the recipe's global batch.

A candidate is a mesh (data x fsdp x tensor inside a host or slice; data x fsdp across them), a gradient
accumulation and a rematerialisation policy. Kept only when every parameter dimension divides over the mesh axes
the rule table maps it to (the check `sharding.state_shardings` makes before any compile), and when each
microbatch (global batch / accumulation) splits evenly over the batch shards (data x fsdp, every host).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh
from tqdm import tqdm

from mellama_jax.config import REMAT_POLICIES, Config, ConfigError, load_config
from mellama_jax.model import init_abstract
from mellama_jax.plan.layouts import (
    PlanRequest,
    _compile,
    _cost,
    analytical,
    gpu_share_bytes,
    plan_layout,
    simulate_devices,
)
from mellama_jax.plan.tpu import chip_of, topology_devices
from mellama_jax.sharding import state_shardings
from mellama_jax.train.flops import measured_matmul_tflops, train_flops_per_token

AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class Candidate:
    ici: dict  # axis -> size within a host (or TPU slice)
    dcn: dict  # axis -> size across hosts
    grad_accum: int
    remat: str

    def overrides(self) -> list[str]:
        """The config overrides that run this candidate."""
        shape = lambda sizes: "{" + ", ".join(f"{a}: {sizes[a]}" for a in AXES) + "}"  # noqa: E731
        return [
            f"mesh.ici={shape(self.ici)}",
            f"mesh.dcn={shape(self.dcn)}",
            f"train.grad_accum={self.grad_accum}",
            f"model.remat={self.remat}",
        ]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(devices_per_host: int, hosts: int) -> list[tuple[dict, dict]]:
    """(ici, dcn) pairs using every device: data x fsdp x tensor inside a host, data x fsdp across hosts (tensor
    parallelism stays on the fast links inside a host)."""
    found = []
    for tensor in divisors(devices_per_host):
        for fsdp in divisors(devices_per_host // tensor):
            ici = {"data": devices_per_host // (tensor * fsdp), "fsdp": fsdp, "tensor": tensor}
            for across in divisors(hosts):
                found.append((ici, {"data": hosts // across, "fsdp": across, "tensor": 1}))
    return found


def _shardable(params, rules, ici: dict, dcn: dict) -> bool:
    """Whether every parameter divides over this mesh under the rule table (abstract: no devices needed)."""
    try:
        state_shardings(params, AbstractMesh(tuple(ici[a] * dcn[a] for a in AXES), AXES), rules)
    except ConfigError:
        return False
    return True


def candidates(
    cfg: Config, devices_per_host: int, hosts: int = 1, remats: tuple[str, ...] = REMAT_POLICIES
) -> list[Candidate]:
    """Every candidate for `cfg` (its model, rule table and global batch `train.batch_size`) on `hosts` hosts of
    `devices_per_host` devices, in a fixed order: layout, then accumulation, then remat policy."""
    params = nnx.state(init_abstract(cfg.model), nnx.Param)
    batch = cfg.train.batch_size
    found = []
    for ici, dcn in layouts(devices_per_host, hosts):
        if not _shardable(params, cfg.mesh.rules, ici, dcn):
            continue
        shards = ici["data"] * ici["fsdp"] * dcn["data"] * dcn["fsdp"]
        for accum in divisors(batch):
            if (batch // accum) % shards:
                continue
            found += [Candidate(ici, dcn, accum, remat) for remat in remats]
    return found


def state_bytes(cfg: Config, estimate: dict | None = None) -> int:
    """Per-device bytes of the train state alone (parameters and optimizer moments, `plan.analytical`, or its
    `estimate` already made): a lower bound on any compiled step's memory, since its arguments hold that state."""
    estimate = estimate or analytical(cfg)
    return estimate["params"] + estimate["optimizer"]


def prune(
    configs: list[tuple[Candidate, Config]], memory_bytes: float, estimates: dict | None = None
) -> list[tuple[Candidate, Config]]:
    """The candidates whose train state alone fits `memory_bytes` per device. Pruning on a lower bound never drops
    one the compiler would fit; what is left is compiled to decide. `estimates`: `plan.analytical` of each config,
    by id, when the caller has them."""
    estimates = estimates or {}
    return [(c, cfg) for c, cfg in configs if state_bytes(cfg, estimates.get(id(cfg))) <= memory_bytes]


_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
}
# the bytes each device sends for an op's result of B bytes over a group of n (ring algorithms)
_MOVED = {
    "all-gather": lambda b, n: b * (n - 1) / n,
    "all-reduce": lambda b, n: 2 * b * (n - 1) / n,
    "reduce-scatter": lambda b, n: b * (n - 1),
    "all-to-all": lambda b, n: b * (n - 1) / n,
    "collective-permute": lambda b, n: b,
}
_COLLECTIVE = re.compile(
    r"=\s*(\(?[^=]*?\)?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
    r"(-start)?\((.*)$"
)
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def _group_size(attributes: str) -> int:
    """Devices per group from an HLO op's replica_groups, in any of its three spellings."""
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attributes)
    if mesh:  # mesh['axis_0'=8,'axis_1'=2] {'axis_0'}: the product of the listed axes
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", mesh.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", mesh.group(2)))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", attributes)
    if iota:  # [groups,size]<=[devices]
        return int(iota.group(2))
    listed = re.search(r"replica_groups=\{\{([\d,]*)\}", attributes)
    if listed:  # {{0,1,2,3},{4,5,6,7}}
        return len(listed.group(1).split(","))
    pairs = re.search(r"source_target_pairs=\{([^}]*)\}", attributes)
    return 2 if pairs else 1


def collective_bytes(hlo: str, slow_axes: tuple[int, ...] | None = None) -> float | tuple[float, float]:
    """Bytes each device sends over its links in one run of a compiled module (`compiled.as_text()`): every
    collective's result, weighted by what a ring moves for it over its group (`_MOVED`); async pairs counted once.
    Given `slow_axes` (the mesh dimensions that cross hosts; may be empty), (bytes on fast links, bytes of the
    collectives whose group spans a slow axis, which the slow links pace)."""
    total, slow = 0.0, 0.0
    for line in hlo.splitlines():
        match = _COLLECTIVE.search(re.sub(r"/\*.*?\*/", "", line))  # long tuples carry /*index=5*/ comments
        if not match:
            continue
        result, op, start, attributes = match.groups()
        shapes = _SHAPE.findall(result)
        if start and op == "all-gather":  # all-gather-start's result is (operand, gathered): the latter
            shapes = shapes[-1:]
        size = sum(
            _DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d) for dtype, dims in shapes
        )
        moved = _MOVED[op](size, max(_group_size(attributes), 1))
        if slow_axes and set(_group_axes(attributes)) & set(slow_axes):
            slow += moved
        else:
            total += moved
    return total if slow_axes is None else (total, slow)


def _group_axes(attributes: str) -> list[int]:
    """The mesh dimensions (0, 1, ...) an op's group runs over, when its replica_groups name them."""
    mesh = re.search(r"replica_groups=mesh\[[^\]]*\]\s*\{([^}]*)\}", attributes)
    return [int(a) for a in re.findall(r"'axis_(\d+)'", mesh.group(1))] if mesh else []


@dataclasses.dataclass(frozen=True)
class Target:
    """The figures a ranking uses for one device (vendors' published numbers; bf16 dense peak, no sparsity)."""

    name: str
    peak_tflops: float
    hbm_tb_per_s: float
    ici_gb_per_s: float  # each way, to the other devices of its host (NVLink) or slice (TPU ICI)
    dcn_gb_per_s: float  # each way, to other hosts (InfiniBand NICs, one per GPU; TPU data-center network)


TARGETS = {
    # NVLink 3: 600 GB/s both ways; DGX A100: one 200 Gb/s HDR InfiniBand NIC per GPU
    "a100": Target("A100-SXM4-80GB", 312.0, 2.039, 300.0, 25.0),
    # NVLink 4: 900 GB/s both ways; DGX H100: one 400 Gb/s NDR NIC per GPU
    "h100": Target("H100-SXM5-80GB", 989.0, 3.35, 450.0, 50.0),
    # TPU v5p (cloud.google.com/tpu/docs/v5p): 459 TFLOP/s bf16, 2,765 GB/s HBM, ICI 4,800 Gbps per chip (600 GB/s
    # over its links, 300 each way); across slices, the data-center network: 200 Gbps per TPU VM (Compute
    # Engine's ct5p-hightpu-4t machine type) shared by its 4 chips, 6.25 GB/s per chip
    "v5p": Target("TPU v5p", 459.0, 2.765, 300.0, 6.25),
}


def step_seconds(
    flops: float, bytes_accessed: float, ici_bytes: float, dcn_bytes: float, t: Target, native: bool = True
) -> float:
    """A step time from the compiled module's totals: compute at peak, plus memory traffic at full bandwidth, plus the
    collectives' bytes over their links. The totals do not say which op did what, and a device runs its ops one
    after another: matmuls are compute bound, the elementwise and optimizer ops that move most bytes memory bound,
    so their times add (taking the longer of the two instead ranked layouts backwards on measured CPU devices;
    docs/benchmarks.md). No overlap with the collectives either: an upper bound on what overlapping them gives.
    `native`: the module came from the target's own compiler (TPU chips; this host's CPUs when calibrating). GPUs
    are compiled here as CPU devices, whose module writes what a GPU keeps on chip (attention's score matrices,
    which cuDNN's fused kernel never stores; unfused elementwise chains), so its traffic only bounds the compute
    from below: the longer of the two."""
    compute, memory = flops / (t.peak_tflops * 1e12), bytes_accessed / (t.hbm_tb_per_s * 1e12)
    links = ici_bytes / (t.ici_gb_per_s * 1e9) + dcn_bytes / (t.dcn_gb_per_s * 1e9)
    return (compute + memory if native else max(compute, memory)) + links


def parameter_count(cfg: Config) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(init_abstract(cfg.model), nnx.Param)))


def traffic_seconds(candidate: Candidate, cfg: Config, target: Target, params: int) -> float:
    """A by-hand estimate of one step's time on the links, for choosing which survivors to compile (the compiled
    module's own collectives rank them after). Per device, ring algorithms: FSDP gathers the bf16-or-fp32 weights
    twice per microbatch (forward, and again for the rematerialised backward) and reduce-scatters fp32 gradients
    once; data parallelism all-reduces the gradients once per step; tensor parallelism all-reduces two activations
    per layer, three times per microbatch (forward, recomputed forward, backward). A group that spans hosts runs at
    the slow links' speed. `params`: the model's parameter count (`parameter_count`)."""
    ici, dcn, m = candidate.ici, candidate.dcn, cfg.model
    tensor, fsdp, data = ici["tensor"], ici["fsdp"] * dcn["fsdp"], ici["data"] * dcn["data"]
    speed = lambda axis: (target.dcn_gb_per_s if dcn[axis] > 1 else target.ici_gb_per_s) * 1e9  # noqa: E731
    weight = 2 if m.param_dtype == "bfloat16" else 4
    shard = params / tensor  # what FSDP and data parallelism move, per device, before their own split
    micro = cfg.train.batch_size // candidate.grad_accum // (fsdp * data)  # sequences per device
    activation = micro * cfg.train.seq_len * m.hidden_size * (2 if m.dtype == "bfloat16" else 4)
    seconds = 0.0
    if fsdp > 1:
        seconds += candidate.grad_accum * (2 * weight + 4) * shard * (fsdp - 1) / fsdp / speed("fsdp")
    if data > 1:
        seconds += 2 * 4 * shard / fsdp * (data - 1) / data / speed("data")
    if tensor > 1:
        seconds += (
            candidate.grad_accum * 3 * 2 * m.num_layers * 2 * activation * (tensor - 1) / tensor / speed("tensor")
        )
    return seconds


def compile_order(
    survivors: list[tuple[Candidate, Config]], estimates: dict, memory: float, target: Target, params: int
) -> list[tuple[Candidate, Config]]:
    """Which survivors to compile first: those the analytical estimate (activations included) expects to fit;
    among them, each in-host (in-slice) layout's best before any layout's second, so that a bounded number of
    compiles covers layouts, not the accumulations or cross-host splits of one; best by least time on the links
    (`traffic_seconds`, a rough guide: the compiled module decides), then candidate order."""
    ordered = sorted(
        survivors,
        key=lambda pair: (
            sum(estimates[id(pair[1])].values()) > memory,
            traffic_seconds(pair[0], pair[1], target, params),
        ),
    )
    seen, repeat = set(), {}
    for candidate, cfg in ordered:
        layout = tuple(candidate.ici.values())
        repeat[id(cfg)] = layout in seen
        seen.add(layout)
    return sorted(ordered, key=lambda pair: (sum(estimates[id(pair[1])].values()) > memory, repeat[id(pair[1])]))


def step_cost(cfg: Config, slow_axes: tuple[int, ...], devices=None) -> dict:
    """The whole step's FLOPs, memory traffic and collective bytes per device. XLA's analysis counts a loop's body
    once (the scanned layers as one), so the step is compiled with one and with two layers unrolled and the
    difference, one layer, extrapolated to the model's depth; grad_accum multiplies the lot."""

    def measured(layers: int) -> dict:
        small = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_layers=layers, scan_unroll=layers))
        compiled = _compile(small, devices)[0]
        ici, dcn = collective_bytes(compiled.as_text(), slow_axes)
        return {**_cost(compiled), "ici_bytes": ici, "dcn_bytes": dcn}

    one, two = measured(1), measured(2)
    layers, accum = cfg.model.num_layers, cfg.train.grad_accum
    return {k: (one[k] + (layers - 1) * (two[k] - one[k])) * accum for k in one}


def rank(configs, target: Target, memory_bytes: float, devices=None, native: bool = True) -> list[dict]:
    """Each (candidate, config) compiled: its memory per device (XLA's, the whole step) against `memory_bytes`, and its
    step time on `target` (`step_seconds`, `native` as there); those that fit first, fastest first."""
    rows = []
    for candidate, cfg in configs:
        slow = tuple(i for i, a in enumerate(AXES) if candidate.dcn[a] > 1)
        memory = plan_layout(cfg, devices)["xla_bytes"]["total"]
        cost = step_cost(cfg, slow, devices)
        seconds = step_seconds(
            cost["flops"], cost["bytes_accessed"], cost["ici_bytes"], cost["dcn_bytes"], target, native
        )
        tokens = cfg.train.batch_size * cfg.train.seq_len
        count = math.prod(candidate.ici.values()) * math.prod(candidate.dcn.values())
        model_flops = train_flops_per_token(cfg.model, cfg.train.seq_len, cfg.adapters) * tokens
        rows.append(
            {
                "candidate": candidate,
                "memory_bytes": memory,
                "fits": memory <= memory_bytes,
                **cost,
                "step_s": seconds,
                "tokens_per_s": tokens / seconds,
                "mfu": model_flops / (count * target.peak_tflops * 1e12 * seconds),
            }
        )
    return sorted(rows, key=lambda r: (not r["fits"], r["step_s"]))


def request_overrides(r: PlanRequest) -> list[str]:
    """The config overrides a search (and its calibration runs) applies: the user's, then the model preset."""
    return list(r.overrides) + ([f"model.preset={r.model}"] if r.model else [])


CALIBRATE_ON_CPU = (
    "plan --search --calibrate compares with this host's simulated CPU devices (JAX_PLATFORMS=cpu), "
    "whose figures it measures; not with --target tpu or on an accelerator"
)


def search(r: PlanRequest, progress: bool = True) -> dict:
    """Candidates -> pruned on the train state -> `max_compiles` of the survivors compiled and ranked, those the
    analytical estimate expects to fit first (see the module)."""
    started = time.perf_counter()
    if r.calibrate and r.target == "tpu":
        raise ConfigError(CALIBRATE_ON_CPU)
    cluster = _tpu_cluster(r) if r.target == "tpu" else _gpu_cluster(r)  # sets the simulated devices up first
    if r.calibrate and jax_backend() != "cpu":
        raise ConfigError(CALIBRATE_ON_CPU)
    if r.calibrate:  # the predictions are compared with this host's devices, so they use this host's figures
        cluster = dataclasses.replace(cluster, target=host_target(cluster.count))
    overrides = request_overrides(r)
    cfg = load_config(r.config, overrides)
    found = candidates(cfg, cluster.per_group, cluster.groups, r.remats)
    memory = cluster.usable_bytes
    configs = [(c, load_config(r.config, overrides + c.overrides())) for c in found]
    estimates = {id(cfg): analytical(cfg) for _, cfg in configs}  # once each: pruning and ordering both read it
    survivors = prune(configs, memory, estimates)
    chosen = compile_order(survivors, estimates, memory, cluster.target, parameter_count(cfg))[: r.max_compiles]
    native = r.target == "tpu" or bool(r.calibrate)  # compiled by the target's own compiler (see step_seconds)
    rows = rank(tqdm(chosen, desc="compiling", disable=not progress), cluster.target, memory, cluster.devices, native)
    for row in rows:
        row["days_to_budget"] = r.tokens / row["tokens_per_s"] / 86400
    best = next((row for row in rows if row["fits"]), None)
    command = None
    if best is not None and not (r.target == "tpu" and r.slices > 1):  # tpu_pod.sh launches one slice
        extra = " ".join(f"'{o}'" for o in best["candidate"].overrides() + overrides)
        command = f"{cluster.launcher} {r.config or 'CONFIG'} {extra}"
    return {
        "model": cfg.model.name,
        "devices": cluster.count,
        "gpu": cluster.target.name,
        "memory_gib": cluster.memory_gib,
        "usable_gib": cluster.usable_bytes / 2**30,
        "calibration": None,
        "fits": best is not None,
        "candidates": len(found),
        "survivors": len(survivors),
        "compiled": len(chosen),
        "search_s": time.perf_counter() - started,
        "rows": [_plain(row) for row in rows],
        "command": command,
    }


@dataclasses.dataclass(frozen=True)
class Cluster:
    """What a search lays its candidates over: `groups` of `per_group` devices (hosts of GPUs, TPU slices) joined by
    the slow network, the device figures, the memory each device has and the part of it XLA may use, the devices
    compiled for (None: JAX's, simulated CPUs) and the launcher."""

    per_group: int
    groups: int
    target: Target
    memory_gib: float
    usable_bytes: float
    devices: list | None
    launcher: str

    @property
    def count(self) -> int:
        return self.per_group * self.groups


def _gpu_cluster(r: PlanRequest) -> Cluster:
    if not r.devices or r.devices % r.devices_per_host:
        raise ConfigError(
            f"plan --search: --devices {r.devices} is not a whole number of hosts of "
            f"{r.devices_per_host} (--devices-per-host)"
        )
    if r.gpu not in ("a100", "h100"):
        raise ConfigError(f"plan --search: --gpu {r.gpu} is not one of ['a100', 'h100']")

    simulate_devices(r.devices)  # the GPUs compiled for
    hosts = r.devices // r.devices_per_host
    return Cluster(
        r.devices_per_host,
        hosts,
        TARGETS[r.gpu],
        r.memory_gib,
        gpu_share_bytes(r.memory_gib),
        None,
        f"sbatch --nodes={hosts} launch/slurm_gpu.sbatch",
    )


def _tpu_cluster(r: PlanRequest) -> Cluster:
    """The chips of `r.slices` slices of `r.topology`; ICI spans a slice, so the whole slice is one group."""
    if not r.topology:
        raise ConfigError("plan --search --target tpu needs --topology, e.g. v5p:4x4x8")
    name, chip = chip_of(r.topology)
    if name not in TARGETS:
        raise ConfigError(
            f"plan --search --target tpu: the interconnect of {name} is not known here; "
            f"the search ranks {sorted(n for n in TARGETS if n.startswith('v'))}"
        )

    devices = topology_devices(r.topology, r.slices)
    simulate_devices(len(devices))  # the mesh the analytical estimate lays out
    return Cluster(
        len(devices) // r.slices,
        r.slices,
        TARGETS[name],
        chip.hbm_gib,
        chip.hbm_gib * 2**30,
        devices,
        "TPU_NAME=... ZONE=... launch/tpu_pod.sh",
    )


def jax_backend() -> str:
    return jax.default_backend()


def copy_gb_per_s(megabytes: int = 256) -> float:
    """This host's memory bandwidth, measured: the best of three copies of a buffer (read plus write bytes)."""
    source = np.ones(megabytes << 17)  # 8-byte elements
    target = np.empty_like(source)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.nbytes / best / 1e9


def host_target(count: int) -> Target:
    """The figures of `count` simulated devices sharing this host: each has 1/count of the measured matmul rate and
    of the measured copy bandwidth, which also paces their collectives (between simulated devices, a copy)."""
    tflops, copy = measured_matmul_tflops(), copy_gb_per_s()
    return Target(f"this host's CPU / {count}", tflops / count, copy / count / 1e3, copy / count, copy / count)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (ties take their average rank)."""

    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    spread = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / spread if spread else None  # all equal on one side: no order to compare


def _plain(row: dict) -> dict:
    c = row["candidate"]
    return {
        **{k: v for k, v in row.items() if k != "candidate"},
        "ici": c.ici,
        "dcn": c.dcn,
        "grad_accum": c.grad_accum,
        "remat": c.remat,
    }


def markdown(result: dict) -> str:
    head = (
        "| ici (data, fsdp, tensor) | dcn | accum | remat | GiB per device | fits | step s | tokens/s | MFU | "
        "days |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {tuple(r['ici'].values())} | {tuple(r['dcn'].values())} | {r['grad_accum']} | {r['remat']} | "
        f"{r['memory_bytes'] / 2**30:.2f} | {'yes' if r['fits'] else 'no'} | {r['step_s']:.3g} | "
        f"{r['tokens_per_s']:,.0f} | {r['mfu']:.2f} | {r['days_to_budget']:.1f} |"
        for r in result["rows"]
    ]
    share = f", XLA may use {result['usable_gib']:.1f}" if result["usable_gib"] < result["memory_gib"] else ""
    return (
        f"{result['model']} on {result['devices']} x {result['gpu']} ({result['memory_gib']:g} GiB{share}): "
        f"{result['candidates']} candidates, {result['survivors']} after pruning, {result['compiled']} compiled "
        f"in {result['search_s']:.0f} s\n\n"
        + head
        + "\n".join(lines)
        + (
            f"\n\nbest: {result['command']}"
            if result["command"]
            else "\n\nbest: the first row (launch/tpu_pod.sh starts one slice: launch several with your multislice "
            "setup)"
            if result["fits"]
            else "\n\nnone fits"
        )
        + (_calibration_markdown(result["calibration"]) if result.get("calibration") else "")
    )


def _calibration_markdown(calibration: dict) -> str:
    lines = [
        f"| {tuple(r['ici'].values())} | {r['grad_accum']} | {r['remat']} | {r['predicted_s']:.3g} | "
        + (f"{r['measured_s']:.3g} |" if "measured_s" in r else f"failed: {r['error'][:80]} |")
        for r in calibration["runs"]
    ]
    rho = calibration["spearman"]
    return (
        "\n\nmeasured on this host's devices:\n\n| ici (data, fsdp, tensor) | accum | remat | predicted s | "
        "measured s |\n|---|---|---|---|---|\n"
        + "\n".join(lines)
        + (f"\n\nSpearman's rank correlation: {rho:.2f}" if rho is not None else "")
    )
