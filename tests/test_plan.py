"""The ahead-of-time planner: XLA's memory analysis of the real train step on simulated devices."""

import subprocess
import sys
from pathlib import Path

import jax
import pytest

from mellama_jax.config import CONFIG_ROOT, load_config
from mellama_jax.plan.layouts import PlanRequest, analytical, plan, plan_layout


def test_small_model_state_bytes_match_by_hand():
    cfg = load_config(
        None,
        [
            "model=tiny-gqa",
            "train.seq_len=32",
            "train.batch_size=8",
            "train.steps=2",
            "mesh.ici={data: 2, fsdp: 4, tensor: 1}",
        ],
    )
    row = plan_layout(cfg)
    est = analytical(cfg)
    batch = 5 * (8 // 8) * 32 * 4  # five (B, T) int32/float32 arrays, one row per device
    scalars = 3 * 4  # step and two optimizer counts (int32)
    assert row["xla_bytes"]["arguments"] == est["params"] + est["optimizer"] + batch + scalars
    assert row["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}


def test_bad_layouts_are_reported_not_raised():
    overrides = ("model=tiny-gqa", "train.seq_len=32", "train.batch_size=8", "train.steps=2")
    result = plan(
        PlanRequest(overrides=overrides, devices=jax.device_count(), layouts=("tensor=8", "fsdp=8"), memory_gib=80.0)
    )
    bad, good = result["layouts"]
    assert "does not divide" in bad["error"] and good["fits"] is True


def test_a_layout_fits_a_gpu_when_it_fits_the_launchers_share_of_its_memory():
    """XLA may take 92% of a GPU under launch/slurm_gpu.sbatch (its XLA_PYTHON_CLIENT_MEM_FRACTION default): a step
    planned at T bytes does not fit a card of T / 0.95 bytes (XLA gets 0.968 T) and fits one of T / 0.9 (1.022 T)."""
    import re

    from mellama_jax.plan.layouts import GPU_MEMORY_FRACTION, GiB

    sbatch = (Path(__file__).parent.parent / "launch" / "slurm_gpu.sbatch").read_text()
    assert float(re.search(r"XLA_PYTHON_CLIENT_MEM_FRACTION:-([\d.]+)", sbatch).group(1)) == GPU_MEMORY_FRACTION
    overrides = ("model=tiny-gqa", "train.seq_len=32", "train.batch_size=8", "train.steps=2")
    request = PlanRequest(overrides=overrides, devices=jax.device_count(), layouts=("fsdp=8",))
    planned = plan(request)["layouts"][0]["xla_bytes"]["total"]
    for card, fits in ((planned / 0.95, False), (planned / 0.9, True)):
        row = plan(
            PlanRequest(overrides=overrides, devices=jax.device_count(), layouts=("fsdp=8",), memory_gib=card / GiB)
        )["layouts"][0]
        assert row["fits"] is fits, (card, planned)


@pytest.mark.slow  # 20 s of two CLI plans (make test-all runs it); the planner's rows are checked above
def test_70b_on_160_devices_and_13b_on_8():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mellama_jax.cli",
            "plan",
            "--config",
            str(CONFIG_ROOT / "me-llama-70b-pretrain.yaml"),
            "--devices",
            "160",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    row = [l for l in out.stdout.splitlines() if l.startswith("| config")][0]
    assert "'fsdp': 32" in row and "| 24.11 |" in row and "| yes |" in row  # 69B x 12 B / 32 devices
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mellama_jax.cli",
            "plan",
            "--config",
            str(CONFIG_ROOT / "me-llama-13b-pretrain.yaml"),
            "--devices",
            "8",
            "mesh.dcn={data: 1, fsdp: 1, tensor: 1}",
            "train.batch_size=128",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| 18.19 |" in [l for l in out.stdout.splitlines() if l.startswith("| config")][0]


def test_planned_activations_follow_the_microbatch_not_the_global_batch():
    """Gradient accumulation runs one microbatch at a time: 32 sequences in 4 microbatches hold the activations
    of 8, as a batch of 8 does, and a quarter of what 32 at once hold (every term is linear in the sequences)."""
    common = ["model=tiny-gqa", "train.seq_len=32", "train.steps=2", "mesh.ici={data: 2, fsdp: 4, tensor: 1}"]
    accumulated = analytical(load_config(None, common + ["train.batch_size=32", "train.grad_accum=4"]))
    small = analytical(load_config(None, common + ["train.batch_size=8"]))
    whole = analytical(load_config(None, common + ["train.batch_size=32"]))
    assert accumulated["activations"] == small["activations"] == whole["activations"] // 4


def test_search_candidates_by_hand_on_a_small_case():
    """tiny-gqa (2 KV heads) on 4 devices, global batch 8, one remat policy. Layouts (tensor, fsdp, data):
    tensor 4 cannot split 2 KV heads, leaving (1,1,4), (1,2,2), (1,4,1) with 4 batch shards and (2,1,2), (2,2,1)
    with 2. Accumulation k keeps 8 / k rows per microbatch, which must divide by the shards: k in {1, 2} for 4
    shards, {1, 2, 4} for 2. 3 x 2 + 2 x 3 = 12 candidates."""
    from mellama_jax.plan.search import candidates

    cfg = load_config(None, ["model=tiny-gqa", "train.batch_size=8", "train.steps=1"])
    found = candidates(cfg, 4, 1, remats=("full",))
    assert len(found) == 12
    assert {c.ici["tensor"] for c in found} == {1, 2}
    assert sorted({(c.ici["fsdp"] * c.ici["data"], c.grad_accum) for c in found}) == [
        (2, 1),
        (2, 2),
        (2, 4),
        (4, 1),
        (4, 2),
    ]


def test_search_candidates_for_70b_on_160_gpus_keep_the_batch_and_divide():
    """The 70B recipe on 20 hosts of 8: every candidate uses all 160 devices, keeps the recipe's global batch of
    2,560 sequences in microbatches that split evenly over its batch shards, and every parameter dimension divides
    over the axes it is sharded on (checked here from the rule table, dimension by dimension); the recipe's own
    layout is among them."""
    import math

    from flax import nnx

    from mellama_jax.model import init_abstract
    from mellama_jax.plan.search import candidates
    from mellama_jax.sharding import logical_to_spec

    cfg = load_config(CONFIG_ROOT / "me-llama-70b-pretrain.yaml")
    found = candidates(cfg, 8, 20, remats=("full",))
    params = nnx.to_flat_state(nnx.state(init_abstract(cfg.model), nnx.Param))
    for c in found:
        assert math.prod(c.ici.values()) == 8 and math.prod(c.dcn.values()) == 20
        shards = c.ici["data"] * c.ici["fsdp"] * c.dcn["data"] * c.dcn["fsdp"]
        assert 2560 % c.grad_accum == 0 and (2560 // c.grad_accum) % shards == 0
        sizes = {a: c.ici[a] * c.dcn[a] for a in c.ici}
        for _, var in params:
            spec = logical_to_spec(var.get_metadata()["out_sharding"], cfg.mesh.rules)
            for dim, axes in zip(var.shape, tuple(spec) + (None,) * (len(var.shape) - len(spec))):
                axes = () if axes is None else axes if isinstance(axes, tuple) else (axes,)
                assert dim % math.prod(sizes[a] for a in axes) == 0
    recipe = (cfg.mesh.ici, cfg.mesh.dcn, cfg.train.grad_accum)
    assert any((c.ici, c.dcn, c.grad_accum) == recipe for c in found)
    assert all(c.ici["tensor"] <= 8 for c in found) and len(found) > 50


@pytest.mark.slow  # ~70 s: one compile per candidate
def test_search_pruning_never_drops_a_candidate_the_compiler_fits():
    """tiny on 8 simulated devices, every layout and accumulation (one remat policy): each candidate's step is
    compiled (what `plan` does) and its XLA total taken; with the budget set to the median total, every candidate
    that compiles within it survives the pruning (the state bound is at most the compiled arguments)."""
    import statistics

    from mellama_jax.plan.search import candidates, prune, state_bytes

    base = ["model=tiny", "train.batch_size=16", "train.seq_len=32", "train.steps=1"]
    found = candidates(load_config(None, base), 8, 1, remats=("full",))
    configs = [(c, load_config(None, base + c.overrides())) for c in found]
    compiled = {id(c): plan_layout(cfg)["xla_bytes"] for c, cfg in configs}
    for c, cfg in configs:
        assert state_bytes(cfg) <= compiled[id(c)]["arguments"], c
    budget = statistics.median(x["total"] for x in compiled.values())
    kept = {id(c) for c, _ in prune(configs, budget)}
    assert {id(c) for c, _ in configs if compiled[id(c)]["total"] <= budget} <= kept
    assert len(kept) < len(configs)  # and it does prune something at this budget


def test_collective_bytes_by_hand():
    """What each device sends for a collective's result of B bytes over a group of n (rings): all-gather B (n-1)/n,
    all-reduce 2 B (n-1)/n, reduce-scatter B (n-1). Compiled on 8 devices: summing a sharded (8, 1024) f32 array
    over its sharded axis all-reduces 4,096 bytes, 2 x 4096 x 7/8 = 7,168; replicating it all-gathers 32,768 bytes,
    x 7/8 = 28,672. And the other spellings of the groups, on written lines."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from mellama_jax.plan.search import collective_bytes

    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    x = jax.device_put(jnp.zeros((8, 1024), jnp.float32), NamedSharding(mesh, P("x")))
    whole = NamedSharding(mesh, P())
    assert collective_bytes(jax.jit(lambda a: (a * 2).sum(0), out_shardings=whole).lower(x).compile().as_text()) == 7168
    assert collective_bytes(jax.jit(lambda a: a + 1, out_shardings=whole).lower(x).compile().as_text()) == 28672
    # on a 4 x 2 mesh the sum runs over the 4-way axis only: 2 x 4096 x 3/4 = 6,144
    mesh2 = jax.make_mesh((4, 2), ("x", "y"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    x2 = jax.device_put(jnp.zeros((8, 1024), jnp.float32), NamedSharding(mesh2, P("x")))
    summed = jax.jit(lambda a: (a * 2).sum(0), out_shardings=NamedSharding(mesh2, P()))
    assert collective_bytes(summed.lower(x2).compile().as_text()) == 6144
    lines = [
        "%a = bf16[256]{0} all-reduce(%p), replica_groups=[2,4]<=[8], to_apply=%add",  # 2 x 512 x 3/4
        "%b = f32[16]{0} reduce-scatter(%q), replica_groups={{0,1},{2,3}}, dimensions={0}",  # 64 x 1
        "%c = (f32[4]{0}, f32[4]{0}) all-reduce(%r, %s), replica_groups={{0,1,2,3}}",  # 2 x 32 x 3/4
        "%d = (f32[2]{0}, f32[8]{0}) all-gather-start(%t), replica_groups={{0,1,2,3}}, dimensions={0}",  # 32 x 3/4
        "%e = f32[8]{0} all-gather-done(%d)",
        "%f = f32[8]{0} add(%u, %v)",
    ]
    assert collective_bytes("\n".join(lines)) == 768 + 64 + 48 + 24


def test_step_cost_counts_the_gradient_all_reduce_by_hand():
    """tiny at 4 layers, pure data parallelism over 8 devices: the step's collectives are the fp32 gradients'
    all-reduce. Parameters by hand: a layer holds q, k, v, o (4 x 64 x 64) + the MLP (3 x 64 x 176) + 2 norms (64)
    = 50,304; 4 layers, embedding and head (2 x 256 x 64) and the final norm: 234,048. A ring all-reduce sends
    2 x 4 B x 234,048 x 7/8 = 1,638,336 bytes per device, plus a few scalars (the loss and its normaliser); the
    layers are extrapolated from 1- and 2-layer compiles. With the data axis crossing hosts (dcn) the same bytes go
    over the slow links instead."""
    from mellama_jax.plan.search import step_cost

    base = ["model=tiny", "model.num_layers=4", "train.batch_size=16", "train.seq_len=32", "train.steps=1"]
    cfg = load_config(None, base + ["mesh.ici={data: 8, fsdp: 1, tensor: 1}"])
    fast = step_cost(cfg, ())
    assert 1_638_336 <= fast["ici_bytes"] <= 1_638_336 + 100 and fast["dcn_bytes"] == 0
    slow = step_cost(
        load_config(None, base + ["mesh.ici={data: 4, fsdp: 1, tensor: 1}", "mesh.dcn={data: 2, fsdp: 1, tensor: 1}"]),
        (0,),
    )
    assert slow["ici_bytes"] == 0 and slow["dcn_bytes"] == fast["ici_bytes"]
    assert slow["flops"] == fast["flops"] > 0


def test_step_time_by_hand():
    """On an A100 (312 TFLOP/s, 2.039 TB/s HBM, 300 GB/s NVLink, 25 GB/s InfiniBand): 1e12 FLOPs -> 3.205 ms,
    2.039e9 bytes of memory traffic -> 1 ms, added when the target's own compiler counted them, else the longer of
    the two; 3e8 bytes over NVLink -> 1 ms, 2.5e7 over InfiniBand -> 1 ms."""
    from mellama_jax.plan.search import TARGETS, step_seconds

    assert step_seconds(1e12, 0.0, 3e8, 2.5e7, TARGETS["a100"]) == pytest.approx(1e12 / 312e12 + 2e-3)
    assert step_seconds(1e12, 2.039e9, 3e8, 2.5e7, TARGETS["a100"]) == pytest.approx(1e12 / 312e12 + 3e-3)
    # a module from a stand-in compiler (a GPU compiled as CPU devices): its traffic bounds compute from below
    assert step_seconds(1e12, 2.039e9, 3e8, 2.5e7, TARGETS["a100"], native=False) == pytest.approx(1e12 / 312e12 + 2e-3)
    assert step_seconds(1e12, 4 * 2.039e9, 0.0, 0.0, TARGETS["a100"], native=False) == pytest.approx(4e-3)


@pytest.mark.slow  # ~30 s: three compiles per candidate, twice
def test_search_ranking_by_hand_and_in_order():
    """Two candidates compiled on 8 devices come back fitting first, then fastest first."""
    from mellama_jax.plan.search import TARGETS, candidates, rank

    base = ["model=tiny", "train.batch_size=16", "train.seq_len=32", "train.steps=1"]
    found = candidates(load_config(None, base), 8, 1, remats=("full",))[-2:]  # accumulation 4 and 8
    rows = rank([(c, load_config(None, base + c.overrides())) for c in found], TARGETS["a100"], 80 * 2**30)
    assert len(rows) == 2 and all(r["fits"] for r in rows)
    assert [r["step_s"] for r in rows] == sorted(r["step_s"] for r in rows)
    assert all(0 < r["mfu"] < 1 and r["tokens_per_s"] == pytest.approx(16 * 32 / r["step_s"]) for r in rows)
    budget = min(r["memory_bytes"] for r in rows)  # now only the smaller one fits: it comes first, fast or not
    tight = rank([(c, load_config(None, base + c.overrides())) for c in found], TARGETS["a100"], budget)
    assert [r["fits"] for r in tight] == [True, False] and tight[0]["memory_bytes"] == budget


@pytest.mark.slow  # ~40 s: two searches of two candidates, three compiles each
def test_plan_search_prints_a_ranked_table_and_a_launch_command_that_dry_runs(capsys):
    """`plan --search` on tiny over 8 devices (one host), two candidates compiled: JSON rows fitting first and
    fastest first, the counts of each stage, and a launch command for the best that the sbatch script accepts
    (its dry run prints the per-process command with the chosen layout)."""
    import json
    import os
    import shlex

    from mellama_jax.cli import main

    recipe = str(CONFIG_ROOT / "tiny-pretrain.yaml")
    code = main(
        [
            "plan",
            "--search",
            "--config",
            recipe,
            "--devices",
            "8",
            "--max-compiles",
            "2",
            "--json",
            "train.batch_size=16",
            "train.seq_len=32",
            "train.steps=1",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["compiled"] == 2 and result["survivors"] <= result["candidates"]
    steps = [r["step_s"] for r in result["rows"]]
    assert steps == sorted(steps) and all(r["fits"] for r in result["rows"])
    assert result["usable_gib"] == pytest.approx(80 * 0.92)  # what launch/slurm_gpu.sbatch lets XLA take
    best = result["rows"][0]["memory_bytes"]  # on a card of best / 0.95 bytes XLA gets 0.968 x best: no fit
    main(
        [
            "plan",
            "--search",
            "--config",
            recipe,
            "--devices",
            "8",
            "--max-compiles",
            "2",
            "--json",
            "--memory-gib",
            str(best / 0.95 / 2**30),
            "train.batch_size=16",
            "train.seq_len=32",
            "train.steps=1",
        ]
    )
    tight = json.loads(capsys.readouterr().out)
    usable = tight["usable_gib"] * 2**30
    assert usable == pytest.approx(0.92 * tight["memory_gib"] * 2**30) and usable < best
    assert all(r["fits"] == (r["memory_bytes"] <= usable) for r in tight["rows"])
    # the first search's best no longer fits the share, so the search compiles candidates its estimate expects to
    # fit there (more accumulation, another layout) and ranks one that does first
    assert tight["fits"] is True and tight["rows"][0]["memory_bytes"] <= usable < best
    which = lambda r: (r["ici"], r["dcn"], r["grad_accum"], r["remat"])  # noqa: E731
    assert all(not r["fits"] for r in tight["rows"] if which(r) == which(result["rows"][0]))
    from mellama_jax.plan.search import TARGETS, step_seconds

    for r in result["rows"]:  # compiled as CPU devices, not by a GPU's compiler: memory traffic a lower bound only
        assert r["step_s"] == pytest.approx(
            step_seconds(r["flops"], r["bytes_accessed"], r["ici_bytes"], r["dcn_bytes"], TARGETS["a100"], native=False)
        )
    command = shlex.split(result["command"])
    assert command[:3] == ["sbatch", "--nodes=1", "launch/slurm_gpu.sbatch"] and command[3] == recipe
    repo = Path(__file__).resolve().parents[1]
    dry = subprocess.run(
        ["bash", "launch/slurm_gpu.sbatch", *command[3:]],
        cwd=repo,
        capture_output=True,
        text=True,
        env=dict(os.environ, DRY_RUN="1", NODES="1"),
    )
    assert dry.returncode == 0, dry.stderr
    assert "mesh.ici={data: " in dry.stdout and f"train.grad_accum={result['rows'][0]['grad_accum']}" in dry.stdout


def test_traffic_estimate_by_hand():
    """tiny-gqa (P parameters, counted from the model), fp32 weights, batch 16 x 32 on 8 devices of an A100
    host (300 GB/s NVLink, 25 GB/s InfiniBand):
    - fsdp 8, accumulation 2: 2 x (2 x 4 + 4) B x P x 7/8 over NVLink;
    - data 8 across 8 hosts: 2 x 4 B x P x 7/8 over InfiniBand;
    - tensor 2 x data 4, accumulation 1: 3 x 2 x layers x 2 x (4 x 32 x hidden x 4 B) x 1/2 over NVLink, plus data's
      all-reduce of P/2."""
    from mellama_jax.plan.search import TARGETS, Candidate, parameter_count, traffic_seconds

    cfg = load_config(None, ["model=tiny-gqa", "train.batch_size=16", "train.seq_len=32"])
    p, a100, m = parameter_count(cfg), TARGETS["a100"], cfg.model
    one = {"data": 1, "fsdp": 1, "tensor": 1}
    fsdp = Candidate({"data": 1, "fsdp": 8, "tensor": 1}, one, 2, "full")
    assert traffic_seconds(fsdp, cfg, a100, p) == pytest.approx(2 * 12 * p * 7 / 8 / 300e9)
    data = Candidate(one, {"data": 8, "fsdp": 1, "tensor": 1}, 1, "full")
    assert traffic_seconds(data, cfg, a100, p) == pytest.approx(8 * p * 7 / 8 / 25e9)
    tensor = Candidate({"data": 4, "fsdp": 1, "tensor": 2}, one, 1, "full")
    activations = 4 * 32 * m.hidden_size * 4
    assert traffic_seconds(tensor, cfg, a100, p) == pytest.approx(
        (3 * 2 * m.num_layers * 2 * activations / 2 + 8 * p / 2 * 3 / 4) / 300e9
    )


@pytest.mark.slow  # ~20 s: libtpu's compiler, three candidates
def test_plan_search_on_tpu_chips_prints_a_pod_command_that_dry_runs():
    """`plan --search --target tpu`: candidates over a v5p slice's chips, compiled by the TPU compiler, ranked on
    v5p's figures, and the best as a `launch/tpu_pod.sh` command whose dry run carries the chosen layout. In a fresh
    process, as a user runs it: the search lays the analytical estimate out on as many CPU devices as chips."""
    import json
    import os
    import shlex

    recipe = str(CONFIG_ROOT / "tiny-pretrain.yaml")
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "TPU_SKIP_MDS_QUERY": "1",
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", ""),
    }
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mellama_jax.cli",
            "plan",
            "--search",
            "--target",
            "tpu",
            "--topology",
            "v5p:2x2x1",
            "--config",
            recipe,
            "--max-compiles",
            "2",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["gpu"] == "TPU v5p" and result["devices"] == 4 and result["memory_gib"] == 95
    assert result["compiled"] == 2 and [r["step_s"] for r in result["rows"]] == sorted(
        r["step_s"] for r in result["rows"]
    )
    from mellama_jax.plan.search import TARGETS, step_seconds

    for r in result["rows"]:  # the TPU compiler's own module: its memory traffic adds to the step
        assert r["step_s"] == pytest.approx(
            step_seconds(r["flops"], r["bytes_accessed"], r["ici_bytes"], r["dcn_bytes"], TARGETS["v5p"])
        )
    command = shlex.split(result["command"])
    assert command[:3] == ["TPU_NAME=...", "ZONE=...", "launch/tpu_pod.sh"] and command[3] == recipe
    repo = Path(__file__).resolve().parents[1]
    dry = subprocess.run(
        ["bash", "launch/tpu_pod.sh", *command[3:]],
        cwd=repo,
        capture_output=True,
        text=True,
        env=dict(os.environ, DRY_RUN="1", WORKERS="1", TPU_NAME="x", ZONE="y"),
    )
    assert dry.returncode == 0, dry.stderr
    assert f"train.grad_accum={result['rows'][0]['grad_accum']}" in dry.stdout


def test_calibrate_is_refused_where_the_devices_are_not_this_hosts_cpus(monkeypatch):
    """--calibrate compares with this host's simulated CPUs: with JAX on an accelerator (JAX reporting a GPU
    backend) it is refused in one line, before anything is compiled."""
    from mellama_jax.config import ConfigError
    from mellama_jax.plan.search import search

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(ConfigError, match="--calibrate compares with this host's simulated CPU devices"):
        search(PlanRequest(devices=8, calibrate=2, overrides=("model=tiny",)), progress=False)


def test_host_figures_split_this_hosts_measured_rates_over_its_devices():
    """Each of n simulated devices gets 1/n of the matmul rate and of the copy bandwidth, which paces both its
    memory traffic (in TB/s) and its collectives (in GB/s): the same number in two units. Against a copy timed
    here, within a factor 2 (a shared VM's bandwidth drifts)."""
    from mellama_jax.plan.search import copy_gb_per_s, host_target

    t = host_target(8)
    assert t.hbm_tb_per_s * 1e3 == pytest.approx(t.ici_gb_per_s) == pytest.approx(t.dcn_gb_per_s)
    assert 0.5 < t.ici_gb_per_s * 8 / copy_gb_per_s() < 2
    assert 0 < t.peak_tflops < 1  # a CPU host: a few TFLOP/s at most in all, split 8 ways


def test_spearman_by_hand():
    """Ranks (1, 2, 3, 4) against (2, 1, 4, 3): d = (1, 1, 1, 1), rho = 1 - 6 * 4 / (4 * 15) = 0.6; ties take their
    average rank: (1, 2, 2, 3) against itself is 1; reversed order is -1."""
    from mellama_jax.plan.search import spearman

    assert spearman([0.1, 0.2, 0.3, 0.4], [2.0, 1.0, 4.0, 3.0]) == pytest.approx(0.6)
    assert spearman([1, 5, 5, 9], [1, 5, 5, 9]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # scipy.stats.spearmanr


@pytest.mark.slow  # ~1-2 min: six candidates compiled three times each, then run
def test_plan_search_calibrates_against_runs_on_this_host():
    """`--calibrate 6` on 8 simulated devices: six candidates that fit are run (bench mesh's timing), each with its
    prediction from this host's measured figures, and the rank correlation of the two is reported. Run as a user
    runs it, in a fresh process whose JAX has not started: the search itself sets the 8 devices up."""
    import json
    import os

    from mellama_jax.plan.search import spearman

    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", ""),
    }
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mellama_jax.cli",
            "plan",
            "--search",
            "--config",
            str(CONFIG_ROOT / "tiny-pretrain.yaml"),
            "--devices",
            "8",
            "--max-compiles",
            "6",
            "--calibrate",
            "6",
            "--json",
            "train.batch_size=16",
            "train.seq_len=32",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    runs = result["calibration"]["runs"]
    assert len(runs) == 6 and result["gpu"] == "this host's CPU / 8"
    fitting = [r for r in result["rows"] if r["fits"]][:6]
    assert [(r["ici"], r["grad_accum"]) for r in runs] == [(r["ici"], r["grad_accum"]) for r in fitting]
    assert [r["predicted_s"] for r in runs] == [r["step_s"] for r in fitting]
    assert all(r["measured_s"] > 0 for r in runs)
    assert result["calibration"]["spearman"] == pytest.approx(
        spearman([r["predicted_s"] for r in runs], [r["measured_s"] for r in runs])
    )


def test_compile_order_covers_layouts_before_accumulations():
    """Survivors expected to fit come first; among them one candidate per in-host layout (the least link time) before
    any layout's second; the order inside each class is by the link-time estimate."""
    from mellama_jax.plan.layouts import analytical
    from mellama_jax.plan.search import TARGETS, candidates, compile_order, parameter_count, traffic_seconds

    base = ["model=tiny", "train.batch_size=16", "train.seq_len=32"]
    cfg = load_config(None, base)
    pairs = [(c, load_config(None, base + c.overrides())) for c in candidates(cfg, 8, 1, remats=("full",))]
    estimates = {id(c): analytical(c) for _, c in pairs}
    memory = sorted(sum(e.values()) for e in estimates.values())[len(pairs) // 2]  # about half expected to fit
    params, a100 = parameter_count(cfg), TARGETS["a100"]
    order = compile_order(pairs, estimates, memory, a100, params)
    assert sorted(id(c) for _, c in order) == sorted(id(c) for _, c in pairs)
    fits = [sum(estimates[id(c)].values()) <= memory for _, c in order]
    assert fits == sorted(fits, reverse=True) and 0 < sum(fits) < len(fits)
    fitting = order[: sum(fits)]
    layouts = [tuple(c.ici.values()) for c, _ in fitting]
    distinct = len(set(layouts))
    assert len(set(layouts[:distinct])) == distinct  # every fitting layout once before any repeats
    times = [traffic_seconds(c, k, a100, params) for c, k in fitting[:distinct]]
    assert times == sorted(times)
