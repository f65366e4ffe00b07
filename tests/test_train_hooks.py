"""The training loop's hooks, one at a time, on tiny inputs (the whole run: test_training_run.py)."""

import functools
import json
import os
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_helpers import TINY, single_device, synthetic_batch

from mellama_jax import saved_params
from mellama_jax.config import LoraConfig, load_config, load_model_preset
from mellama_jax.storage import RunMirror
from mellama_jax.train import checkpoint, flops
from mellama_jax.train.hooks import (
    Checkpointing,
    DocumentsWarning,
    Evaluation,
    FiniteGuard,
    Hook,
    LogMetrics,
    NonFiniteLoss,
    StepInfo,
    StopOnSignal,
    export_params,
    plot_curves,
)
from mellama_jax.train.loop import run_steps
from mellama_jax.train.metrics import MetricsLogger


def add_step(state, frozen, batch):
    """A stand-in for the jitted step where the hooks only need a state that changes and some metrics."""
    return state + batch, {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(1.0)}


def counting(step_fn):
    """step_fn, and a list that grows by one each time it runs (what a `stop` callback can look at)."""
    done = []

    def step(state, frozen, batch):
        done.append(batch)
        return step_fn(state, frozen, batch)

    return step, done


def calls(hook_kwargs, steps=10, start=0, stop_after=None):
    seen = []
    step, done = counting(add_step)
    run_steps(
        step,
        0,
        None,
        iter(range(1, 100)),
        start,
        steps,
        [Hook(lambda i: seen.append(i.step), **hook_kwargs)],
        lambda: len(done) == stop_after,
    )
    return seen


def test_every_at_end_and_at_stop():
    assert calls({"every": 3}) == [3, 6, 9, 10]  # the multiples of 3, and the last step
    assert calls({"every": 3, "at_end": False}) == [3, 6, 9]
    assert calls({"every": 0}) == [10]
    assert calls({"every": 1, "at_end": False}) == list(range(1, 11))
    assert calls({"every": 3}, start=4) == [6, 9, 10]  # resumed after step 4
    # `stop` turns true after the 5th step: the loop ends there; only at_stop hooks see that step
    assert calls({"every": 3}, stop_after=5) == [3]
    assert calls({"every": 3, "at_stop": True}, stop_after=5) == [3, 5]
    assert calls({"every": 3, "at_stop": True}, stop_after=6) == [3, 6]  # once, though due twice over
    # a finished run started again: no step runs, and only the end-of-run hooks are called (no metrics)
    assert calls({"every": 1, "at_end": False}, start=10) == []
    assert calls({"every": 5}, start=10) == [10]


def test_run_steps_threads_state_and_reports_the_stop():
    infos = []
    state, step, stopped = run_steps(
        add_step, 0, None, iter([5, 6, 7, 8]), 0, 4, [Hook(infos.append, every=1)], lambda: len(infos) == 2
    )
    assert (state, step, stopped) == (5 + 6 + 7, 3, True)
    assert [(i.step, i.state, i.last, i.stopping) for i in infos] == [
        (1, 5, False, False),
        (2, 11, False, False),
        (3, 18, False, True),
    ]
    state, step, stopped = run_steps(add_step, 0, None, iter([5, 6]), 0, 2, [], lambda: False)
    assert (state, step, stopped) == (11, 2, False)


def info(step, loss, grad_norm=1.0):
    return StepInfo(step, None, {"loss": jnp.float32(loss), "grad_norm": jnp.float32(grad_norm)}, False, False)


def test_finite_guard_names_the_first_bad_step_of_those_unchecked():
    guard = FiniteGuard(last_saved=lambda: 4)
    for i in [info(5, 2.0), info(6, 1.0)]:
        guard.record(i)
    guard.check()  # all finite: nothing raised, nothing left to check
    assert guard.unchecked == []
    for i in [info(7, 1.0), info(8, 1.5, grad_norm=float("inf")), info(9, float("nan")), info(10, 1.0)]:
        guard.record(i)
    with pytest.raises(
        NonFiniteLoss,
        match=r"at step 8 \(loss=1.5, grad_norm=inf\).*last good checkpoint "
        r"\(step 4\)",
    ):
        guard.check()
    record, check = guard.hooks(every=5)
    assert (record.every, record.at_end, check.every, check.at_end) == (1, False, 5, True)


def test_finite_guard_lets_skipped_steps_pass_until_too_many_in_a_row():
    def skipped(step, flag=1):
        return StepInfo(
            step,
            None,
            {
                "loss": jnp.float32(float("nan") if flag else 1.0),
                "grad_norm": jnp.float32(1),
                "skipped": jnp.int32(flag),
            },
            False,
            False,
        )

    guard = FiniteGuard(last_saved=lambda: 10, max_skipped=3)
    for i in [skipped(11), skipped(12), skipped(13, 0), skipped(14), skipped(15)]:  # 2, then 2 in a row
        guard.record(i)
    guard.check()
    assert guard.skipped_total == 4
    guard.record(skipped(16))
    with pytest.raises(NonFiniteLoss, match=r"steps 14-16: 3 in a row, each skipped.*\(step 10\) is untouched"):
        guard.check()


def test_checkpointing_saves_each_step_once_only_after_the_guard_passes(tmp_path):
    from mellama_jax.config import CheckpointConfig

    mngr = checkpoint.manager(tmp_path, CheckpointConfig(keep_last=10, async_save=False))
    iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
    guard = FiniteGuard(mngr.latest_step)
    saving = Checkpointing(mngr, iterator, {"seed": 1}, None, guard.check)
    batches = ({"x": jnp.float32(next(iterator))} for _ in range(100))  # the iterator's position moves with the steps
    step, done = counting(add_to_x)
    hooks = [*guard.hooks(every=100), Hook(saving, every=3, at_stop=True)]
    start = {"x": jnp.float32(0)}
    state, _, stopped = run_steps(step, start, None, batches, 0, 10, hooks, lambda: len(done) == 5)
    assert stopped and mngr.all_steps() == [3, 5]  # the cadence, and the step the stop came after
    saving(StepInfo(5, state, None, True, False))  # called again at a step it has saved: not saved twice
    restored = iter(grain.MapDataset.range(100).to_iter_dataset())
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state5, meta = checkpoint.restore(mngr, 5, saved_params.abstract_like(start, {"x": device}), restored)
    assert float(state5["x"]) == float(state["x"]) == sum(range(5)) and (meta["step"], meta["seed"]) == (5, 1)
    assert next(restored) == 5  # the data position travels with the state
    guard.record(info(6, float("nan")))
    with pytest.raises(NonFiniteLoss, match="at step 6"):
        saving(StepInfo(6, state, None, False, True))
    assert mngr.all_steps() == [3, 5]  # nothing of the bad step saved
    mngr.close()


def add_to_x(state, frozen, batch):
    x, metrics = add_step(state["x"], frozen, batch["x"])
    return {"x": x}, metrics


def test_log_metrics_throughput_and_mfu(tmp_path):
    cfg = load_model_preset("tiny")
    ticks = iter([100.0, 104.0, 104.5, 106.5, 107.0])  # start; after step 4 (+ its write); after step 6
    lora = LoraConfig(rank=8, targets=("wq", "w_down"))
    mfu = functools.partial(flops.mfu, cfg, 32, peak_flops_per_device=1e9, num_devices=2, lora=lora)
    log = MetricsLogger(tmp_path, 6, 0, True, False, tensorboard=False)
    hook = LogMetrics(log, tokens_per_step=8 * 32, mfu=mfu, start_step=0, clock=lambda: next(ticks))
    hook(info(4, 2.5))
    hook(info(6, 2.0))
    log.close()
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # 4 steps of 256 tokens in 4 s; then 2 steps in 106.5 - 104.5 = 2 s
    assert [(r["step"], r["tokens_per_s"], r["step_time_s"]) for r in lines] == [(4, 256.0, 1.0), (6, 256.0, 1.0)]
    # LoRA counts 4 FLOPs per frozen weight per token and 6 per adapter weight:
    # (4 * matmul weights + 6 * adapters + attention) * 256 tokens/s / 2e9. The tiny model's adapters: 2 layers x
    # rank 8 x (wq: 64 in + 64 out, w_down: 176 in + 64 out) = 2 * 8 * (128 + 240) = 5888 weights.
    attention = 3 * cfg.num_layers * 4 * 32 * cfg.num_heads * cfg.head_dim / 2
    assert flops.adapter_params(cfg, lora) == 5888
    assert lines[0]["mfu"] == pytest.approx((4 * flops.matmul_params(cfg) + 6 * 5888 + attention) * 256 / 2e9)
    assert lines[0]["loss"] == 2.5 and lines[0]["kind"] == "train"


def test_one_peak_for_mfu():
    assert flops.peak_tflops_per_device(8, configured=123.0) == 123.0
    if jax.default_backend() == "cpu":  # the measured matmul rate of the machine, split over its devices
        whole = flops.peak_tflops_per_device(1)
        assert 0 < flops.peak_tflops_per_device(4) < whole
    assert flops.mfu(load_model_preset("tiny"), 32, 1000.0, 0.0, 8) == 0.0  # unknown peak: not reported


def test_documents_warning_is_said_once(capsys, tmp_path):
    log = MetricsLogger(tmp_path, 10, 0, True, False, tensorboard=False)  # messages printed: no progress bar
    hook = DocumentsWarning(log, max_segments=8, enabled=True)
    for step, documents in [(1, 3), (2, 8), (3, 9), (4, 12)]:
        hook(StepInfo(step, None, {"documents_per_row_max": jnp.float32(documents)}, False, False))
    out = capsys.readouterr().out
    assert out.count("documents") == 1 and "step 3: a row holds 9 documents" in out
    quiet = DocumentsWarning(log, max_segments=8, enabled=False)  # not the cuDNN kernel: nothing to say
    quiet(StepInfo(1, None, {"documents_per_row_max": jnp.float32(20)}, False, False))
    assert capsys.readouterr().out == ""


@pytest.fixture(scope="module")
def tiny():
    from mellama_jax import sharding
    from mellama_jax.train.step import build_trainer, make_eval_step

    cfg = load_config(None, TINY)
    trainer, state, frozen = build_trainer(cfg, sharding.make_mesh(cfg.mesh, single_device()))
    return trainer, state, frozen, make_eval_step(trainer)


def test_evaluation_pools_tokens_over_batches(tiny, tmp_path):
    trainer, state, frozen, eval_step = tiny
    rng = np.random.default_rng(0)
    batches = [synthetic_batch(rng, 8, 16, trainer.cfg.model.vocab_size) for _ in range(3)]
    batches[1]["loss_weights"][:6] = 0  # batches of unequal weight: a mean of means would differ
    log = MetricsLogger(tmp_path, 10, 0, True, False, tensorboard=False)
    hook = Evaluation(eval_step, trainer.shard_batch, frozen, batches, max_batches=2, log=log)
    hook(StepInfo(7, state, None, False, False))
    log.close()
    # Independently: logits from the model, cross-entropy in numpy, pooled over the first two batches' tokens
    total = weight = 0.0
    for b in batches[:2]:
        inputs = [jnp.asarray(b[k], jnp.int32) for k in ("inputs", "positions", "segment_ids")]
        logits = np.asarray(trainer.model(state.params, frozen)(*inputs), np.float64)
        log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll = log_z - np.take_along_axis(logits, b["targets"][..., None], -1)[..., 0]
        total, weight = total + (nll * b["loss_weights"]).sum(), weight + b["loss_weights"].sum()
    assert hook.last["loss"] == pytest.approx(total / weight, rel=1e-5)
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert (line["step"], line["kind"], line["loss"]) == (7, "eval", hook.last["loss"])


def test_export_writes_the_final_parameters_only_at_the_end(tiny, tmp_path):
    trainer, state, frozen, _ = tiny
    hook = Hook(functools.partial(export_params, tmp_path / "params"))
    states = [state._replace(step=state.step + k) for k in range(3)]
    for k, s in enumerate(states):
        assert not hook.due(StepInfo(k + 1, s, {}, False, False))
    end = StepInfo(3, states[-1], {}, True, False)
    assert hook.due(end)
    hook.fn(end)
    loaded = saved_params.load_params_local(tmp_path / "params", state.params)
    for (path, a), (_, b) in zip(nnx.to_flat_state(loaded), nnx.to_flat_state(state.params)):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))


def test_plots_come_from_the_metrics_file(tmp_path):
    log = MetricsLogger(tmp_path, 3, 0, True, False, tensorboard=False)
    for step, loss in [(1, 3.0), (2, 2.5), (3, 2.0)]:
        log.log(step, {"loss": loss, "tokens_per_s": 100.0})
    log.log(3, {"loss": 2.2}, "eval")
    log.close()
    plot_curves(tmp_path, StepInfo(3, None, None, True, False))
    pngs = sorted(tmp_path.glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)


def test_stop_on_signal_asks_once_signalled_and_puts_the_handlers_back():
    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to this (main) thread before os.kill returns
        assert stop.requested() and stop.reason == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_runs_hooks_save_on_a_stop_and_export_at_the_end(tiny, tmp_path):
    """train()'s own hook list on the real step: a signal's stop saves that step and exports nothing; the run's
    end logs, evaluates, saves and exports; a resumed run carries on from the saved step."""
    from mellama_jax.train.loop import _hooks
    from mellama_jax.train.step import make_train_step

    trainer, state, frozen, eval_step = tiny
    state = jax.tree.map(jnp.copy, state)  # the step donates its state: keep the fixture's
    cfg = load_config(
        None,
        TINY
        + [f"run.dir={tmp_path}", "run.log_every=2", "checkpoint.every=1000", "run.peak_tflops=1", "run.plot=true"],
    )
    rng = np.random.default_rng(1)
    data = grain.MapDataset.source([synthetic_batch(rng, 8, 16, cfg.model.vocab_size) for _ in range(8)])

    def run(start, steps, stop_after=None):
        iterator = iter(data.to_iter_dataset())
        mngr = checkpoint.manager(tmp_path / "checkpoints", cfg.checkpoint)
        if start:
            restored = checkpoint.restore(
                mngr, start, saved_params.abstract_like(state, trainer.state_shardings), iterator
            )[0]
        log = MetricsLogger(tmp_path, steps, start, True, False, tensorboard=False)
        guard = FiniteGuard(mngr.latest_step)
        saving = Checkpointing(mngr, iterator, {}, start or None, guard.check)
        evaluation = Evaluation(eval_step, trainer.shard_batch, frozen, data, 2, log)
        hooks = _hooks(
            cfg, trainer, log, guard, evaluation, saving, tmp_path / "params", start, RunMirror(str(tmp_path))
        )  # process 0's, of a local run directory: plots, no uploads
        step_fn, done = counting(make_train_step(trainer))
        out = run_steps(
            step_fn,
            restored if start else state,
            frozen,
            map(trainer.shard_batch, iterator),
            start,
            steps,
            hooks,
            lambda: len(done) == stop_after,
        )
        mngr.wait_until_finished()
        saved = mngr.all_steps()
        log.close()
        mngr.close()
        lines = [(r["step"], r["kind"]) for r in map(json.loads, (tmp_path / "metrics.jsonl").open())]
        return out[1:], saved, lines

    (step, stopped), saved, lines = run(0, 8, stop_after=5)
    assert (step, stopped, saved) == (5, True, [5])
    assert lines == [(2, "train"), (4, "train")] and (tmp_path / "loss.png").exists()
    assert not (tmp_path / "params").exists()
    (step, stopped), saved, lines = run(5, 8)
    assert (step, stopped, saved) == (8, False, [5, 8])
    assert lines[2:] == [(6, "train"), (8, "train"), (8, "eval")]
    assert (tmp_path / "params").exists()


def test_stop_on_signal_asks_the_other_processes_only_on_logging_steps(monkeypatch):
    """Two processes' worth of StopOnSignal (JAX's allgather replaced by a recorder standing in for the other
    process): the collective, which makes the host wait for the step, runs after steps 5 and 10 only, starting
    from a resume at step 3; a signal after step 6 stops the run after step 10, where every process agrees."""
    from jax.experimental import multihost_utils

    gathered = []

    def allgather(local):
        gathered.append(bool(local[0]))
        return np.array([local, [False]])

    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    with StopOnSignal(process_count=2, every=5, start=3) as stop:
        decisions = []
        for step in range(4, 13):
            if step == 7:
                os.kill(os.getpid(), signal.SIGTERM)
            decisions.append((step, stop.requested()))
    assert stop.collectives == 2 and gathered == [False, True]
    assert [step for step, stop_now in decisions if stop_now] == [10]


def test_goodput_charges_each_category_by_the_hosts_clock(tmp_path):
    """A fake clock: start-up 10 s, the first step call (compiling, its step included) 20 s, 9 more steps at 1 s,
    one checkpoint save of 5 s: wall 44 s, stepping 9 s over 10 steps (0.9 s each); 2 steps redone after a resume
    and 1 skipped cost 2.7 s of it: goodput = 6.3 / 44."""
    from mellama_jax.train.goodput import Goodput, steps_logged_before, summary_line

    now = [0.0]
    g = Goodput(clock=lambda: now[0])

    def step(x):
        now[0] += 1.0
        return x

    def compile_then_step(x):
        now[0] += 19.0
        return step(x)

    first = {"done": False}

    def step_fn(x):
        if not first["done"]:
            first["done"] = True
            return compile_then_step(x)
        return step(x)

    now[0] = 10.0
    run = g.first_call_compiles(step_fn)
    save = g.timed("checkpoint", lambda: now.__setitem__(0, now[0] + 5.0))
    for k in range(10):
        run(k)
        if k == 4:
            save()
    r = g.report(steps_run=10, redone=2, skipped=1)
    assert (r["startup_s"], r["compile_s"], r["checkpoint_s"], r["wall_s"]) == (10.0, 20.0, 5.0, 44.0)
    # stepping = 44 - 10 (start-up) - 20 (compile, the first step's own second included) - 5 = 9 s over 10 steps
    assert r["redone_s"] == pytest.approx(1.8) and r["skipped_s"] == pytest.approx(0.9)
    assert r["productive_s"] == pytest.approx(9 - 2.7) and r["goodput"] == pytest.approx(6.3 / 44)
    assert summary_line(r).startswith("goodput 14% of 44 s (startup 10.0 s, compile 20.0 s, checkpoint 5.0 s")
    (tmp_path / "metrics.jsonl").write_text('{"step": 3}\n{"step": 7, "kind": "eval"}\nnot json\n')
    assert steps_logged_before(tmp_path / "metrics.jsonl") == 7 and steps_logged_before(tmp_path / "none") == 0


def test_held_out_loss_per_source_and_bits_per_byte(tiny, tmp_path):
    """Two sources in the same batches (rows tagged by source): each source's loss equals an independent numpy
    forward over that source's rows only; bits per byte = nats / ln 2 / the UTF-8 bytes of the predicted tokens
    (here a made-up byte table); the first evaluation at step 0 is kept, and the summary gives the change."""
    trainer, state, frozen, _ = tiny
    from mellama_jax.train.step import make_eval_step

    rng = np.random.default_rng(3)
    batches = []
    for _ in range(2):
        b = synthetic_batch(rng, 8, 16, trainer.cfg.model.vocab_size)
        b["source_ids"] = np.repeat(rng.integers(0, 2, (8, 1)), 16, axis=1).astype(np.int32)
        batches.append(b)
    token_bytes = rng.integers(1, 5, trainer.cfg.model.vocab_size)
    log = MetricsLogger(tmp_path, 10, 0, True, False, tensorboard=False)
    hook = Evaluation(
        make_eval_step(trainer, 2),
        functools.partial(trainer.shard_batch, extra=("source_ids",)),
        frozen,
        batches,
        max_batches=2,
        log=log,
        sources=("biomedical", "general"),
        token_bytes=token_bytes,
    )
    hook(StepInfo(0, state, None, False, False))
    log.close()
    nats, weights, nbytes = np.zeros(2), np.zeros(2), np.zeros(2)
    for b in batches:
        inputs = [jnp.asarray(b[k], jnp.int32) for k in ("inputs", "positions", "segment_ids")]
        logits = np.asarray(trainer.model(state.params, frozen)(*inputs), np.float64)
        log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll = log_z - np.take_along_axis(logits, b["targets"][..., None], -1)[..., 0]
        for s in range(2):
            rows = b["source_ids"][:, 0] == s
            nats[s] += (nll * b["loss_weights"])[rows].sum()
            weights[s] += b["loss_weights"][rows].sum()
            nbytes[s] += (token_bytes[b["targets"]] * (b["loss_weights"] > 0))[rows].sum()
    for s, name in enumerate(("biomedical", "general")):
        assert hook.last[f"loss/{name}"] == pytest.approx(nats[s] / weights[s], rel=1e-5)
        assert hook.last[f"bpb/{name}"] == pytest.approx(nats[s] / np.log(2) / nbytes[s], rel=1e-5)
    assert hook.last["loss"] == pytest.approx(nats.sum() / weights.sum(), rel=1e-5)
    summary = hook.summary()
    assert summary["held_out_at_step_0"] == summary["held_out"] and summary["held_out_change"]["loss/general"] == 0
