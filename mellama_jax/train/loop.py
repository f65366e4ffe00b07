"""The run: data, state (fresh, from `init_from`, or resumed), the step loop, evaluation, checkpoints, metrics.

Exactly resumable: the data order is a pure function of (seed, step), dropout keys of (seed, step), and the
checkpoint holds the train state and the iterator position together. SIGTERM/SIGINT saves the current step and
returns cleanly. A non-finite loss stops the run before anything from that step is saved.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from pathlib import Path

import jax
import numpy as np

from mellama_jax import sharding
from mellama_jax.config import Config, to_dict
from mellama_jax.data.instruct import InstructSource, instruct_batches
from mellama_jax.data.pretrain import (iterate, pretrain_batches, pretrain_epoch_rows, pretrain_eval_batches)
from mellama_jax.model import attention
from mellama_jax.train import checkpoint, flops
from mellama_jax.train.metrics import MetricsLogger, peak_tflops_per_device
from mellama_jax.train.run_dir import check_run_dir, write_run_files
from mellama_jax.train.step import make_eval_step, make_train_step, plan_trainer


class NonFiniteLoss(RuntimeError):
    pass


def epochs_for(cfg: Config, examples: int) -> int:
    if cfg.train.epochs:
        return cfg.train.epochs
    if cfg.train.mode == "pretrain":
        return 1
    if cfg.train.mode == "lora":
        return 3
    return 5 if examples < 10_000 else 3  # sft, as in the paper


def build_data(cfg: Config, process_index: int, process_count: int):
    """(train batches, eval batches or None, steps) for this process."""
    d, t = cfg.data, cfg.train
    if not d.path:
        raise FileNotFoundError("data.path is empty: point it at a directory written by `mellama-jax prepare`")
    if t.mode == "pretrain":
        rows = pretrain_epoch_rows(d.path, d.mixture, t.seq_len, cfg.seed, d.holdout_documents)
        train = pretrain_batches(d.path, d.mixture, t.seq_len, t.batch_size, cfg.seed, process_index,
                                 process_count, "train", d.holdout_documents)
        evaluation = (pretrain_eval_batches(d.path, d.mixture, t.seq_len, t.batch_size, cfg.seed,
                                            d.holdout_documents, process_index, process_count)
                      if d.holdout_documents else None)
    else:
        rows = len(InstructSource(d.path))
        # An explicit train.steps longer than the epochs runs more (reshuffled) epochs.
        epochs = max(epochs_for(cfg, rows), -(-t.steps * t.batch_size // rows))
        train = instruct_batches(d.path, t.seq_len, t.batch_size, epochs, cfg.seed, process_index, process_count)
        evaluation = (instruct_batches(d.eval_path, t.seq_len, t.batch_size, 1, cfg.seed, process_index,
                                       process_count, shuffle=False, pad=True) if d.eval_path else None)
    steps = t.steps or max(1, rows * epochs_for(cfg, rows) // t.batch_size)
    return train, evaluation, steps


def train(cfg: Config) -> dict:
    run_dir = Path(cfg.run.dir)
    pi, pc = jax.process_index(), jax.process_count()
    main = pi == 0
    train_ds, eval_ds, steps = build_data(cfg, pi, pc)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
    check_run_dir(cfg)
    if main:
        write_run_files(cfg)

    mesh = sharding.make_mesh(cfg.mesh)
    trainer, init = plan_trainer(cfg, mesh)
    with jax.set_mesh(mesh):
        state, frozen = init()
    if cfg.train.init_from:
        state, frozen = _load_initial_params(cfg, trainer, state, frozen)
    iterator = iterate(train_ds, cfg.data.read_threads)
    mngr = checkpoint.manager(run_dir / "checkpoints", cfg.checkpoint)
    start = mngr.latest_step()
    if start is not None:
        state, _ = checkpoint.restore(mngr, start, checkpoint.abstract_like(state, trainer.state_shardings),
                                      iterator)
    saved_step = start
    start = int(start or 0)

    step_fn, eval_fn = make_train_step(trainer), make_eval_step(trainer)
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    flops_per_token = flops.train_flops_per_token(cfg.model, cfg.train.seq_len, cfg.train.mode == "lora")
    peak, peak_source = peak_tflops_per_device(cfg.run.peak_tflops)
    log = MetricsLogger(run_dir, steps, start, main, cfg.run.progress)
    log.message(f"{cfg.train.mode}: {cfg.model.name}, {steps} steps of {cfg.train.batch_size} x "
                f"{cfg.train.seq_len} tokens on mesh {dict(mesh.shape)}"
                + (f", resuming at step {start}" if start else "") + f"; run dir {run_dir}")

    stop = {"signal": None}
    handlers = {s: signal.signal(s, lambda n, _: stop.update(signal=signal.Signals(n).name))
                for s in (signal.SIGTERM, signal.SIGINT)}
    pending: list[tuple[int, dict]] = []
    last_log_time, last_log_step = time.perf_counter(), start
    meta = {"seed": cfg.seed, "mode": cfg.train.mode, "config": to_dict(cfg)}

    def check_finite():
        for s, m in pending:
            host = {k: float(v) for k, v in m.items()}
            if not (math.isfinite(host["loss"]) and math.isfinite(host["grad_norm"])):
                raise NonFiniteLoss(f"non-finite loss at step {s} (loss={host['loss']}, grad_norm="
                                    f"{host['grad_norm']}); stopped without saving: the last good checkpoint "
                                    f"(step {mngr.latest_step()}) is untouched")
        pending.clear()

    warn = {"documents": attention.resolve(cfg.model.attention) == "cudnn"}  # said once per run

    def warn_documents(step, documents):
        if warn["documents"] and documents > cfg.model.max_segments:
            warn["documents"] = False
            log.message(f"step {step}: a row holds {int(documents)} documents, more than model.max_segments="
                        f"{cfg.model.max_segments}: such batches take cuDNN's masked attention kernel, ~10% slower "
                        f"per step at 7B (docs/benchmarks.md); a larger max_segments avoids that")

    def save(step):
        nonlocal saved_step
        check_finite()
        checkpoint.save(mngr, step, state, iterator, dict(meta, step=step))
        saved_step = step

    status, last_eval = "finished", None
    try:
        step = start
        while step < steps:
            batch = trainer.shard_batch(next(iterator))
            state, metrics = step_fn(state, frozen, batch)
            step += 1
            pending.append((step, metrics))
            log.advance()
            if step % cfg.run.log_every == 0 or step == steps:
                host = {k: float(v) for k, v in metrics.items()}
                check_finite()
                elapsed = time.perf_counter() - last_log_time
                rate = tokens_per_step * (step - last_log_step) / elapsed
                host.update(tokens_per_s=rate, step_time_s=elapsed / (step - last_log_step),
                            mfu=flops_per_token * rate / (peak * 1e12 * jax.device_count()) if peak else 0.0)
                log.log(step, host)
                warn_documents(step, host["documents_per_row_max"])
                last_log_time, last_log_step = time.perf_counter(), step
            if eval_ds is not None and cfg.run.eval_every and step % cfg.run.eval_every == 0:
                last_eval = (step, evaluate(eval_fn, trainer, state.params, frozen, eval_ds, cfg.run.eval_batches))
                log.log(step, {"loss": last_eval[1]}, "eval")
            if step % cfg.checkpoint.every == 0:
                save(step)
            if _agreed_stop(stop["signal"] is not None, pc):
                status = f"stopped by {stop['signal'] or 'another process'}"
                break
        if saved_step != step:
            save(step)
        mngr.wait_until_finished()
        result = {"status": status, "step": step, "steps": steps, "run_dir": str(run_dir)}
        if step == steps:
            if eval_ds is not None:
                if last_eval is None or last_eval[0] != step:
                    last_eval = (step, evaluate(eval_fn, trainer, state.params, frozen, eval_ds,
                                                cfg.run.eval_batches))
                    log.log(step, {"loss": last_eval[1]}, "eval")
                result["eval_loss"] = last_eval[1]
            export = run_dir / ("adapters" if cfg.train.mode == "lora" else "params")
            checkpoint.save_params(export, state.params)
            result["export"] = str(export)
        log.message(f"{status} at step {step}/{steps}; checkpoint {run_dir / 'checkpoints' / str(step)}"
                    + (f"; parameters {result['export']}" if "export" in result else ""))
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        log.close()
        mngr.close()
    if main:
        (run_dir / "summary.json").write_text(json.dumps(result, indent=1))
        if cfg.run.plot:
            from mellama_jax.plot import plot_run

            plot_run(run_dir)
    return result


def _agreed_stop(local: bool, process_count: int) -> bool:
    """All processes stop at the same step if any of them was signalled."""
    if process_count == 1:
        return local
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([local]))))


def evaluate(eval_fn, trainer, params, frozen, eval_ds, max_batches: int) -> float:
    total, weight = 0.0, 0.0
    for k in range(min(len(eval_ds), max_batches)):
        ce, w = eval_fn(params, frozen, trainer.shard_batch(eval_ds[k]))
        total, weight = total + float(ce), weight + float(w)
    return total / max(weight, 1.0)


def _load_initial_params(cfg: Config, trainer, state, frozen):
    """Base weights from `init_from`: into the trained parameters (pretrain/sft) or the frozen base (lora)."""
    path = cfg.train.init_from
    if cfg.train.mode == "lora":
        base = checkpoint.load_params(path, frozen, trainer.frozen_shardings)
        return state, base
    params = checkpoint.load_params(path, state.params, trainer.state_shardings.params)
    with jax.set_mesh(trainer.mesh):
        opt_state = jax.jit(trainer.tx.init, out_shardings=trainer.state_shardings.opt_state)(params)
    return state._replace(params=params, opt_state=opt_state), frozen
