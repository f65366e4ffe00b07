"""The training run end to end: exact resume after SIGKILL, SIGTERM, another mesh, LoRA, NaN guard, recipes."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from train_helpers import logged_losses

from mellama_jax import saved_params
from mellama_jax.config import CONFIG_ROOT, load_config
from mellama_jax.train.loop import build_data, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(demo_data):
    return demo_data


def overrides(data, mode, run_dir, *extra):
    common = [
        f"run.dir={run_dir}",
        "run.progress=false",
        "run.plot=false",
        "run.log_every=1",
        "checkpoint.every=4",
        "checkpoint.keep_last=10",
        "train.steps=12",
    ]
    if mode == "pretrain":
        return (
            [
                "train.batch_size=16",
                "train.grad_accum=2",
                f"data.path={data}/pre",
                "data.holdout_documents=1",
                "run.eval_every=6",
            ]
            + common
            + list(extra)
        )
    return [f"data.path={data}/ins", "lora.base_dtype=float32"] + common + list(extra)


CONFIG = {"pretrain": "tiny-pretrain.yaml", "lora": "tiny-lora.yaml"}


losses = logged_losses


def cli(args, **kw):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "mellama_jax.cli", "train"] + args,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def wait_for_step(run_dir, step, proc, timeout=300):
    deadline = time.time() + timeout
    path = Path(run_dir) / "metrics.jsonl"
    while time.time() < deadline:
        if path.exists() and any(json.loads(l)["step"] >= step for l in path.read_text().splitlines() if l):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the run")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Uninterrupted runs, in this process, per mode."""
    out = {}
    for mode in ("pretrain", "lora"):
        run_dir = tmp_path_factory.mktemp(f"ref-{mode}")
        extra = [f"train.init_from={data}/pre-params"] if mode == "lora" else []
        if mode == "lora" and not (data / "pre-params").exists():
            shutil.copytree(out["pretrain"][0] / "params", data / "pre-params")
        result = train(load_config(CONFIG_ROOT / CONFIG[mode], overrides(data, mode, run_dir, *extra)))
        assert result["status"] == "finished"
        out[mode] = (run_dir, losses(run_dir), extra)
    return out


# LoRA's crash-and-resume (22 s) runs with `make test-all`: its checkpoint is the same state tree with fewer leaves
@pytest.mark.parametrize("mode", ["pretrain", pytest.param("lora", marks=pytest.mark.slow)])
def test_sigkill_then_resume_is_bit_exact(mode, data, reference, tmp_path):
    ref_dir, ref_losses, extra = reference[mode]
    args = ["--config", str(CONFIG_ROOT / CONFIG[mode])] + overrides(data, mode, tmp_path, *extra)
    proc = cli(args)
    kill_at = int(np.random.default_rng().integers(6, 12))
    wait_for_step(tmp_path, kill_at, proc)

    # Orbax commits a checkpoint by renaming its temporary directory: only committed ones have a plain name.
    def committed():
        return [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]

    deadline = time.time() + 120
    while not committed() and proc.poll() is None and time.time() < deadline:  # async save still in flight
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = committed()
    assert at_kill, "no checkpoint was committed before the kill"
    logged = max(json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines())
    proc = cli(args)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    assert f"resuming at step {max(at_kill)}" in output
    # goodput: the steps the killed attempt had done past its last checkpoint are charged as redone
    assert json.loads((tmp_path / "summary.json").read_text())["goodput"]["redone_steps"] == logged - max(at_kill)
    assert losses(tmp_path) == ref_losses  # every step, bit for bit
    assert len(ref_losses) == 12 and ref_losses[12] < ref_losses[1]


def test_lr_schedule_logged_is_closed_form_cosine(reference):
    cfg = load_config(reference["pretrain"][0] / "config.yaml")
    records = [json.loads(l) for l in (reference["pretrain"][0] / "metrics.jsonl").read_text().splitlines()]
    total, peak = cfg.train.steps, cfg.optimizer.learning_rate
    warmup = round(cfg.optimizer.warmup_ratio * total)
    for r in (r for r in records if r["kind"] == "train"):
        k = r["step"] - 1  # the update of step s used the schedule at s - 1
        expected = (
            peak * k / warmup if k < warmup else peak * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))
        )
        assert r["learning_rate"] == pytest.approx(expected, rel=1e-5, abs=1e-12)  # fp32 schedule


def test_run_outputs(reference):
    run_dir = reference["pretrain"][0]
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_keys = {"loss", "learning_rate", "grad_norm", "tokens_per_s", "step_time_s", "mfu", "tokens", "skipped"}
    assert train_keys <= set(next(r for r in records if r["kind"] == "train"))
    for r in (r for r in records if r["kind"] == "train"):  # a step is the whole batch, all microbatches: 16 x 64
        assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(16 * 64)
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 6, 12]  # before the first step too: the forgetting probe
    per_source = {f"{m}/{s}" for m in ("loss", "bpb") for s in ("biomedical", "clinical", "general")}
    assert per_source | {"loss", "bpb"} <= set(evals[0])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (
        summary["held_out_change"]["loss/general"]
        == pytest.approx(evals[-1]["loss/general"] - evals[0]["loss/general"])
        and summary["held_out"]["loss"] < evals[0]["loss"]
    )
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "params").exists() and (run_dir / "summary.json").exists()
    g = json.loads((run_dir / "summary.json").read_text())["goodput"]
    parts = g["startup_s"] + g["compile_s"] + g["checkpoint_s"] + g["evaluation_s"] + g["productive_s"]
    assert 0 < g["goodput"] < 1 and g["compile_s"] > 0 and g["evaluation_s"] > 0 and parts <= g["wall_s"] * 1.001
    assert (g["redone_steps"], g["skipped_steps"]) == (0, 0)
    from mellama_jax.plot import plot_run

    assert all(p.exists() and p.stat().st_size > 1000 for p in plot_run(run_dir))


def test_sigterm_saves_and_exits_cleanly(data, tmp_path):
    args = ["--config", str(CONFIG_ROOT / "tiny-pretrain.yaml")] + overrides(
        data, "pretrain", tmp_path, "train.steps=400", "checkpoint.every=1000"
    )
    proc = cli(args)
    wait_for_step(tmp_path, 3, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "stopped by SIGTERM" and 3 <= summary["step"] < 400
    assert (tmp_path / "checkpoints" / str(summary["step"])).exists()


def test_resume_on_a_different_mesh(data, tmp_path):
    first = overrides(data, "pretrain", tmp_path / "a", "checkpoint.every=6", "mesh.ici={data: 1, fsdp: 8, tensor: 1}")
    train(load_config(CONFIG_ROOT / "tiny-pretrain.yaml", first))
    ref = losses(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "12")
    (tmp_path / "b" / "metrics.jsonl").write_text("")
    second = overrides(data, "pretrain", tmp_path / "b", "checkpoint.every=6", "mesh.ici={data: 2, fsdp: 4, tensor: 1}")
    train(load_config(CONFIG_ROOT / "tiny-pretrain.yaml", second))
    resumed = losses(tmp_path / "b")
    assert sorted(resumed) == list(range(7, 13))
    for step, loss in resumed.items():
        assert abs(loss - ref[step]) <= 1e-5


def test_checkpoint_restores_state_step_and_data_position(tmp_path):
    """What a resume rests on, without a run: a checkpoint brings back the whole train state (its step counter,
    which places the schedule and the LoRA dropout keys, included) and the data iterator's position, so the next
    batch read after a restore is the one the saved run would have read next."""
    import grain
    import jax.numpy as jnp

    from mellama_jax import sharding
    from mellama_jax.data.pretrain import iterate
    from mellama_jax.train import checkpoint
    from mellama_jax.train.step import build_trainer

    cfg = load_config(
        None,
        [
            "model=tiny-gqa",
            "train.seq_len=16",
            "train.steps=4",
            "checkpoint.async_save=false",
            "mesh.ici={data: 1, fsdp: 1, tensor: 1}",
        ],
    )
    trainer, state, _ = build_trainer(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
    state = state._replace(step=jax.device_put(jnp.int32(7), trainer.state_shardings.step))
    batches = grain.MapDataset.range(40).batch(4)
    iterator = iterate(batches)
    for _ in range(3):
        next(iterator)
    mngr = checkpoint.manager(tmp_path / "checkpoints", cfg.checkpoint)
    checkpoint.save(mngr, 7, state, iterator, {"step": 7})
    mngr.wait_until_finished()
    expected_next = next(iterator)
    np.testing.assert_array_equal(expected_next, np.arange(12, 16))

    fresh = iterate(batches)
    restored, meta = checkpoint.restore(mngr, 7, saved_params.abstract_like(state, trainer.state_shardings), fresh)
    assert int(restored.step) == 7 and meta["step"] == 7
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(next(fresh), expected_next)  # batch 3 (rows 12-15), not batch 0


def test_lora_trains_only_adapters(data, reference):
    from mellama_jax.train.step import build_trainer, make_train_step

    cfg = load_config(CONFIG_ROOT / "tiny-lora.yaml", overrides(data, "lora", "/unused", *reference["lora"][2]))
    cfg = type(cfg)(**{**cfg.__dict__, "train": type(cfg.train)(**{**cfg.train.__dict__, "steps": 12})})
    trainer, state, frozen = build_trainer(cfg)
    frozen = saved_params.load_params(cfg.train.init_from, frozen, trainer.frozen_shardings)
    before = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(frozen)}
    train_ds, _, _ = build_data(cfg, 0, 1)
    step = make_train_step(trainer)
    first = last = None
    for k in range(12):
        state, m = step(state, frozen, trainer.shard_batch(train_ds[k]))
        first = first if first is not None else float(m["loss"])
        last = float(m["loss"])
    assert last < first
    for p, v in nnx.to_flat_state(frozen):
        np.testing.assert_array_equal(np.asarray(v.get_value()), before[p])  # base untouched, bit for bit
    adapter_sizes = sorted(int(v.get_value().size) for _, v in nnx.to_flat_state(state.params))
    assert all(name in ("lora_a", "lora_b") for path, _ in nnx.to_flat_state(state.params) for name in path[-1:])
    opt_sizes = sorted(int(x.size) for x in jax.tree.leaves(state.opt_state) if x.size > 1)
    assert opt_sizes == sorted(adapter_sizes * 2)  # Adam's two moments, adapter-sized, nothing else
    base = sum(int(v.get_value().size) for _, v in nnx.to_flat_state(frozen))
    assert sum(adapter_sizes) < 0.2 * base


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    args = ["--config", str(CONFIG_ROOT / "tiny-pretrain.yaml")] + overrides(
        data,
        "pretrain",
        tmp_path,
        "checkpoint.every=1",
        "optimizer.learning_rate=1e30",
        "optimizer.warmup_ratio=0.5",
        "optimizer.clip_norm=0",
        "train.skip_nonfinite=false",
    )
    proc = cli(args)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, output[-3000:]
    assert "non-finite loss at step" in output
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    bad = int(output.split("non-finite loss at step ")[1].split()[0])
    assert steps and max(steps) < bad
    from mellama_jax.train import checkpoint
    from mellama_jax.train.step import plan_trainer

    cfg = load_config(tmp_path / "config.yaml")
    trainer, init = plan_trainer(cfg)
    with jax.set_mesh(trainer.mesh):
        state, _ = init()
    mngr = checkpoint.manager(tmp_path / "checkpoints", cfg.checkpoint)
    restored = mngr.restore(
        max(steps),
        args=__import__("orbax.checkpoint").checkpoint.args.Composite(
            state=__import__("orbax.checkpoint").checkpoint.args.StandardRestore(
                saved_params.abstract_like(state, trainer.state_shardings)
            )
        ),
    )
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.state.params))


def test_sft_epochs_follow_the_paper(data):
    cfg = load_config(CONFIG_ROOT / "tiny-sft.yaml", [f"data.path={data}/ins"])
    _, _, steps = build_data(cfg, 0, 1)
    rows = json.loads((data / "ins" / "manifest.json").read_text())["rows"]
    assert rows < 10_000 and steps == rows * 5 // 8  # under 10k examples: 5 epochs


def test_sft_epochs_count_examples_not_packed_rows(data, tmp_path):
    """MedNLI's 11,232 training examples pack into a few hundred rows; the paper's rule (5 epochs under 10k
    examples, else 3) is about examples, so this set trains 3 epochs: steps = rows * 3 // batch."""
    from mellama_jax.data.instruct import InstructDataRequest, prepare_instruct

    path = tmp_path / "mednli.jsonl"
    labels = ("entailment", "contradiction", "neutral")
    path.write_text(
        "".join(json.dumps({"prompt": f"Case {i % 10}?", "response": labels[i % 3]}) + "\n" for i in range(11_232))
    )
    m = prepare_instruct(InstructDataRequest([path], data / "tok", tmp_path / "packed", seq_len=64, pack=True))
    assert m["report"]["documents"] == 11_232 and m["rows"] < 10_000
    cfg = load_config(CONFIG_ROOT / "tiny-sft.yaml", [f"data.path={tmp_path / 'packed'}"])
    assert build_data(cfg, 0, 1)[2] == m["rows"] * 3 // 8


def cli_error(args):
    """`mellama-jax train ...` in this process: (exit code, stderr lines)."""
    import contextlib
    import io

    from mellama_jax.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train"] + args)
    return code, [l for l in err.getvalue().splitlines() if l.strip()]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["train.seq_len=32"], "prepared with --seq-len 64, longer than train.seq_len=32"),
        (["data.template=mellama"], "prepared with the 'llama2_chat' template, but this recipe tunes in 'mellama'"),
        (["checkpoint.keep_last=0"], "checkpoint.keep_last must be at least 1"),
        (["checkpoint.every=-1"], "checkpoint.every must not be negative"),
        (["data.eval_path=DATA/long"], "data.eval_path=DATA/long was prepared with --seq-len 128"),
        (["run.log_every=0"], "run.log_every must be at least 1"),
        (["mesh.ici={data: 3, fsdp: 1, tensor: 1}"], "has 3 devices, but 8 are available"),
        (["train.batch_size=12", "train.grad_accum=3"], "does not divide over the 8 batch shards"),
        (["train.init_from=NOPE"], "no such parameter folder"),
        (["train.init_from=DATA/ins"], "not a parameter checkpoint"),
        (["train.init_from=OTHER"], "has shape"),
    ],
)
def test_a_start_that_fails_validation_writes_nothing(data, tmp_path, extra, message):
    other = tmp_path / "other-size"
    if "train.init_from=OTHER" in extra:  # a parameter export of another model size
        from mellama_jax.model import Llama
        from mellama_jax.saved_params import save_params

        cfg = load_config(CONFIG_ROOT / "tiny-sft.yaml", ["model.hidden_size=32", "model.intermediate_size=64"])
        save_params(other, nnx.state(Llama(cfg.model, rngs=nnx.Rngs(0)), nnx.Param))
    if "data.eval_path=DATA/long" in extra and not (data / "long").exists():  # evaluation data prepared longer
        from mellama_jax.data.instruct import InstructDataRequest, prepare_instruct
        from mellama_jax.demo import _demo_file

        prepare_instruct(InstructDataRequest([_demo_file("instructions.jsonl")], data / "tok", data / "long", 128))
    extra = [
        e.replace("NOPE", str(tmp_path / "nope")).replace("DATA", str(data)).replace("OTHER", str(other)) for e in extra
    ]
    message = message.replace("DATA", str(data))
    run = tmp_path / "run"
    code, lines = cli_error(
        [
            "--config",
            str(CONFIG_ROOT / "tiny-sft.yaml"),
            f"run.dir={run}",
            f"data.path={data}/ins",
            "run.progress=false",
        ]
        + extra
    )
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not run.exists()


def test_a_batch_without_targets_is_named_not_a_nan(data, tmp_path):
    """`prepare instruct` skips examples whose response is cut away, and a run refuses data prepared longer than
    it trains, so a batch of rows without one weighted token comes from data written otherwise: here the demo's
    rows with every loss weight set to 0."""
    import grain
    from array_record.python.array_record_module import ArrayRecordWriter

    shutil.copytree(data / "ins", tmp_path / "ins")
    rows = [
        np.frombuffer(r, np.int32).reshape(3, -1).copy()
        for r in grain.sources.ArrayRecordDataSource([str(data / "ins" / "examples.arrayrecord")])
    ]
    writer = ArrayRecordWriter(str(tmp_path / "ins" / "examples.arrayrecord"), "group_size:1")
    for row in rows:
        row[1] = 0
        writer.write(row.tobytes())
    writer.close()
    run = tmp_path / "run"
    code, lines = cli_error(
        [
            "--config",
            str(CONFIG_ROOT / "tiny-sft.yaml"),
            f"run.dir={run}",
            "run.progress=false",
            f"data.path={tmp_path / 'ins'}",
            "train.steps=2",
            "run.log_every=1",
        ]
    )
    assert code == 2 and "step 1: its batch holds no target token" in lines[-1], lines
    assert "no checkpoint had been saved yet" in lines[-1]


@pytest.mark.parametrize(
    "name, size", [("me-llama-13b-pretrain", "llama2-13b"), ("me-llama-70b-pretrain", "llama2-70b")]
)
def test_pretrain_recipes_carry_the_papers_settings(name, size):
    cfg = load_config(CONFIG_ROOT / f"{name}.yaml")
    o = cfg.optimizer
    assert cfg.model.name == size and cfg.model.dtype == "bfloat16" and cfg.train.seq_len == 4096
    assert (o.learning_rate, o.b1, o.b2, o.weight_decay, o.schedule, o.warmup_ratio) == (
        8e-6,
        0.9,
        0.95,
        1e-5,
        "cosine",
        0.05,
    )
    assert cfg.train.grad_accum == 16 and cfg.train.epochs == 1 and cfg.train.mode == "pretrain"
    assert cfg.data.mixture == {"biomedical": 15, "clinical": 1, "general": 4}
    ici, dcn = cfg.mesh.ici, cfg.mesh.dcn
    assert math.prod(ici.values()) == 8 and math.prod(dcn.values()) == 20  # 20 hosts x 8 GPUs


@pytest.mark.parametrize("name", ["me-llama-13b-chat-lora", "me-llama-70b-chat-lora"])
def test_lora_recipes_carry_the_papers_settings(name):
    cfg = load_config(CONFIG_ROOT / f"{name}.yaml")
    assert cfg.train.mode == "lora" and cfg.train.epochs == 3
    assert cfg.data.template == "mellama"  # the authors' chat wrapper (docs/evaluation.md)
    assert (cfg.optimizer.learning_rate, cfg.optimizer.weight_decay, cfg.optimizer.warmup_ratio) == (1e-5, 1e-5, 0.01)


def test_sft_recipe():
    cfg = load_config(CONFIG_ROOT / "sft.yaml")
    assert cfg.train.mode == "sft" and cfg.optimizer.learning_rate == 1e-5 and cfg.train.epochs == 0


def test_a_checkpoint_write_cut_short_leaves_the_previous_one(data, reference, tmp_path):
    """What a kill during a save leaves behind: a half-written temporary directory. Orbax commits by renaming
    it, so the next run must ignore it and resume from the last committed step."""
    run = tmp_path / "run"
    shutil.copytree(reference["pretrain"][0], run)
    partial = run / "checkpoints" / "13.orbax-checkpoint-tmp-1764100000000000"
    shutil.copytree(run / "checkpoints" / "12", partial)
    for f in list(partial.rglob("*"))[::2]:
        if f.is_file():
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])  # truncated files
    result = train(load_config(CONFIG_ROOT / "tiny-pretrain.yaml", overrides(data, "pretrain", run, "train.steps=14")))
    assert result["status"] == "finished" and result["step"] == 14
    resumed = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in resumed if r["kind"] == "train"]
    assert steps == list(range(1, 13)) + [13, 14]  # the reference's 12 steps, then only 13 and 14: resumed at 12
