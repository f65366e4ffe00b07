"""The run: data, state (fresh, from `init_from`, or resumed), and the step loop with its hooks.

`run_steps` is the loop: the jitted train step, then the hooks that are due (train/hooks.py: the non-finite
guard, metrics with MFU, evaluation, checkpoints, the export, plots). `train` builds the data, state and hooks
from a Config. Exactly resumable: the data order is a pure function of (seed, step), dropout keys of
(seed, step), and the checkpoint holds the train state and the iterator position together. SIGTERM/SIGINT saves
the current step and returns cleanly. A non-finite loss stops the run before anything from that step is saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
from pathlib import Path

import jax

from mellama_jax import distributed, saved_params, sharding, storage
from mellama_jax.config import Config, ConfigError, Mode, to_dict
from mellama_jax.data.instruct_batches import InstructSource, instruct_batches
from mellama_jax.data.pretrain import (
    iterate,
    pretrain_batches,
    pretrain_epoch_rows,
    pretrain_eval_batches,
    read_manifest,
)
from mellama_jax.data.tokenizer import Tokenizer
from mellama_jax.model import attention
from mellama_jax.train import checkpoint, flops
from mellama_jax.train.goodput import Goodput, steps_logged_before, summary_line
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
    run_hooks,
)
from mellama_jax.train.metrics import MetricsLogger
from mellama_jax.train.run_dir import check_run_dir, write_run_files
from mellama_jax.train.step import make_eval_step, make_train_step, plan_trainer

__all__ = ["NonFiniteLoss", "build_data", "run_steps", "train"]


def epochs_for(cfg: Config, examples: int) -> int:
    """The paper's epochs for `examples` instruction examples (not packed rows: the 10k rule counts examples)."""
    if cfg.train.epochs:
        return cfg.train.epochs
    if cfg.train.mode == Mode.PRETRAIN:
        return 1
    if cfg.train.mode == Mode.LORA:
        return 3
    return 5 if examples < 10_000 else 3  # sft, as in the paper


def build_data(cfg: Config, process_index: int, process_count: int):
    """(train batches, eval batches or None, steps) for this process."""
    d, t = cfg.data, cfg.train
    if not d.path:
        raise FileNotFoundError("data.path is empty: point it at a directory written by `mellama-jax prepare`")
    if t.mode == Mode.PRETRAIN:
        rows = pretrain_epoch_rows(d.path, d.mixture, t.seq_len, cfg.seed, d.holdout_documents)
        epochs = epochs_for(cfg, rows)
        train = pretrain_batches(
            d.path,
            d.mixture,
            t.seq_len,
            t.batch_size,
            cfg.seed,
            process_index,
            process_count,
            "train",
            d.holdout_documents,
        )
        evaluation = (
            pretrain_eval_batches(
                d.path, d.mixture, t.seq_len, t.batch_size, cfg.seed, d.holdout_documents, process_index, process_count
            )
            if d.holdout_documents
            else None
        )
    else:
        epochs = epochs_for(cfg, check_instruct_data(cfg, d.path))
        if d.eval_path:
            check_instruct_data(cfg, d.eval_path, "data.eval_path")
        rows = len(InstructSource(d.path))
        # An explicit train.steps longer than the epochs runs more (reshuffled) epochs.
        train = instruct_batches(
            d.path,
            t.seq_len,
            t.batch_size,
            max(epochs, -(-t.steps * t.batch_size // rows)),
            cfg.seed,
            process_index,
            process_count,
        )
        evaluation = (
            instruct_batches(
                d.eval_path, t.seq_len, t.batch_size, 1, cfg.seed, process_index, process_count, shuffle=False, pad=True
            )
            if d.eval_path
            else None
        )
    steps = t.steps or max(1, rows * epochs // t.batch_size)
    return train, evaluation, steps


def check_instruct_data(cfg: Config, path: str, key: str = "data.path") -> int:
    """Refuse instruction data that this run would silently cut or that was rendered in another template than
    the recipe names; returns its number of examples (packed rows hold several)."""
    manifest = read_manifest(path, "mellama-instruct-v1")
    prepared, seq_len = int(manifest["seq_len"]), cfg.train.seq_len
    if prepared > seq_len:
        ways = f"train with train.seq_len={prepared}, or " if prepared <= cfg.model.max_seq_len else ""
        raise ConfigError(
            f"{key}={path} was prepared with --seq-len {prepared}, longer than train.seq_len={seq_len}: "
            f"examples past {seq_len} tokens would be cut, and those whose prompt fills {seq_len} "
            f"would train on nothing; {ways}prepare the data again with --seq-len {seq_len}"
        )
    template = cfg.data.template
    if template and manifest.get("template") != template:
        raise ConfigError(
            f"{key}={path} was prepared with the {manifest.get('template')!r} template, but this "
            f"recipe tunes in {template!r} (data.template); prepare the data again with --template "
            f"{template}, or set data.template={manifest.get('template')}"
        )
    return int(manifest.get("report", {}).get("documents") or manifest["rows"])


def run_steps(step_fn, state, frozen, batches, start: int, steps: int, hooks, stop=lambda: False):
    """Steps start+1 .. steps of `state, metrics = step_fn(state, frozen, batch)`, the due hooks after each;
    stops early after the step at which `stop()` turns true. Returns (state, steps done, stopped early)."""
    if start >= steps:  # a finished run started again: nothing to train, the end-of-run hooks still run
        run_hooks(hooks, StepInfo(start, state, None, last=True, stopping=False))
        return state, start, False
    step, stopping = start, False
    while step < steps and not stopping:
        state, metrics = step_fn(state, frozen, next(batches))
        step += 1
        stopping = stop()
        run_hooks(hooks, StepInfo(step, state, metrics, last=step == steps, stopping=stopping))
    return state, step, stopping


def local_data(cfg: Config) -> Config:
    """`cfg` with its data read from this host's disk: data in a bucket is fetched into the local cache first
    (ArrayRecord and sentencepiece read local files); the run's config.yaml keeps the bucket's path."""
    d = cfg.data
    fetched = dataclasses.replace(
        d,
        path=str(storage.fetch(d.path)) if d.path else d.path,
        eval_path=str(storage.fetch(d.eval_path)) if d.eval_path else d.eval_path,
    )
    return dataclasses.replace(cfg, data=fetched)


def _checked_setup(cfg: Config, pi: int, pc: int) -> tuple:
    """Everything that can be checked, checked before the first file is written: the run directory (before data in
    a bucket is fetched), the data, the mesh against the devices, the batch against the mesh, the shapes in
    init_from. (cfg with the run's steps, the data fetched, train and eval datasets, trainer, init)."""
    check_run_dir(cfg)
    fetched = local_data(cfg)
    train_ds, eval_ds, steps = build_data(fetched, pi, pc)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
    trainer, init = plan_trainer(cfg, sharding.make_mesh(cfg.mesh))
    if cfg.train.init_from:
        saved_params.check_params(cfg.train.init_from, _init_shapes(init, cfg))
    if pi == 0:
        write_run_files(cfg)
    return cfg, fetched, train_ds, eval_ds, trainer, init


def _resumed(mngr, state, trainer, iterator) -> tuple:
    """(the state, the step it was saved at) from the newest checkpoint, with the data iterator's position; or the
    fresh state and None."""
    saved = mngr.latest_step()
    if saved is not None:
        state, _ = checkpoint.restore(mngr, saved, saved_params.abstract_like(state, trainer.state_shardings), iterator)
    return state, saved


def _opening_line(cfg: Config, trainer, start: int, run_dir) -> str:
    return (
        f"{cfg.train.mode}: {cfg.model.name}, {cfg.train.steps} steps of {cfg.train.batch_size} x "
        f"{cfg.train.seq_len} tokens on mesh {dict(trainer.mesh.shape)}"
        + (f", resuming at step {start}" if start else "")
        + f"; run dir {run_dir}"
    )


def _pull_mirror(mirror, pi: int, start: int) -> int:
    """Process 0 brings the run's small files (metrics.jsonl, ...) into its local mirror; returns the steps a resumed
    run does again (logged before it stopped, after its last checkpoint)."""
    if pi == 0:
        mirror.pull()
    return max(0, steps_logged_before(mirror.local / "metrics.jsonl") - start) if start else 0


def _closing_line(result: dict, run_dir, export: Path) -> str:
    step = result["step"]
    return (
        f"{result['status']} at step {step}/{result['steps']}; checkpoint {run_dir / 'checkpoints' / str(step)}"
        + (f"; parameters {export}" if "export" in result else "")
        + "; "
        + summary_line(result["goodput"])
    )


def _finished(evaluation, export: Path) -> dict:
    """What a run that reached its last step adds to its result: the final evaluation and where the export is."""
    out = {}
    if evaluation is not None:
        out["eval_loss"] = evaluation.last["loss"]
        out.update(evaluation.summary())
    out["export"] = str(export)
    return out


def train(cfg: Config) -> dict:
    goodput = Goodput()
    run_dir, mirror = storage.path(cfg.run.dir), storage.RunMirror(cfg.run.dir)
    pi, pc = jax.process_index(), jax.process_count()
    cfg, fetched, train_ds, eval_ds, trainer, init = _checked_setup(cfg, pi, pc)
    steps = cfg.train.steps
    state, frozen = _initial_state(cfg, trainer, init)
    iterator = iterate(train_ds, cfg.data.read_threads)
    mngr = checkpoint.manager(run_dir / "checkpoints", cfg.checkpoint)
    distributed.resume_point = lambda: _resume_point(mngr.latest_step())  # what a dead peer's message names
    state, saved = _resumed(mngr, state, trainer, iterator)
    start = int(saved or 0)
    redone = _pull_mirror(mirror, pi, start)
    log = MetricsLogger(mirror.local, steps, start, pi == 0, cfg.run.progress)
    log.message(_opening_line(cfg, trainer, start, run_dir))
    guard = FiniteGuard(mngr.latest_step, cfg.train.max_skipped_steps)
    meta = {"seed": cfg.seed, "mode": cfg.train.mode, "config": to_dict(cfg)}
    saving = goodput.timed("checkpoint", Checkpointing(mngr, iterator, meta, saved, guard.check))
    evaluation = _evaluation(dataclasses.replace(cfg, data=fetched.data), trainer, frozen, eval_ds, log)
    if evaluation is not None and start == 0:
        evaluation(StepInfo(0, state, None, last=False, stopping=False))  # the model before training
    export = run_dir / ("adapters" if cfg.train.mode == Mode.LORA else "params")
    timed_eval = goodput.timed("evaluation", evaluation) if evaluation is not None else None
    hooks = _hooks(cfg, trainer, log, guard, timed_eval, saving, export, start, mirror if pi == 0 else None)
    # the mirror's last upload comes after the log and the checkpoints are closed, and after a failure too
    uploads = contextlib.closing(mirror) if pi == 0 else contextlib.nullcontext()
    with uploads, StopOnSignal(pc, cfg.run.log_every, start) as stop, contextlib.closing(mngr), contextlib.closing(log):
        step_fn, batches = goodput.first_call_compiles(make_train_step(trainer)), map(trainer.shard_batch, iterator)
        try:
            state, step, stopped = run_steps(step_fn, state, frozen, batches, start, steps, hooks, stop.requested)
        except jax.errors.JaxRuntimeError as e:
            if pc > 1 and PEER_LOST.search(str(e)):  # a collective noticed before the heartbeat did
                distributed.peer_lost(str(e))
            raise
        goodput.timed("checkpoint", mngr.wait_until_finished)()
        result = {
            "status": f"stopped by {stop.reason}" if stopped else "finished",
            "step": step,
            "steps": steps,
            "skipped_steps": guard.skipped_total,
            "run_dir": str(run_dir),
            **(_finished(evaluation, export) if step == steps else {}),
            "goodput": goodput.report(step - start, min(redone, step - start), guard.skipped_total),
        }
        log.message(_closing_line(result, run_dir, export))
    if pi == 0:
        (run_dir / "summary.json").write_text(json.dumps(result, indent=1))
    return result


# What a collective says when a peer died: Gloo (CPU), NCCL (GPU), the coordination service.
PEER_LOST = re.compile(
    r"Gloo|NCCL|Connection (closed|reset)|heartbeat|task .*(died|failed|disconnected)|"
    r"UNAVAILABLE|DEADLINE_EXCEEDED|coordination service",
    re.IGNORECASE,
)


def _resume_point(step: int | None) -> str:
    return f"checkpoint {step}" if step is not None else "the start (no checkpoint was saved yet)"


def _evaluation(cfg: Config, trainer, frozen, batches, log) -> Evaluation | None:
    """Held-out loss, per source of the mixture (pretraining), with bits per byte from the data's tokenizer; None
    without an eval split."""
    if batches is None:
        return None
    sources = tuple(n for n, w in cfg.data.mixture.items() if w > 0) if cfg.train.mode == Mode.PRETRAIN else ()
    tokenizer = Path(cfg.data.path) / "tokenizer.model"
    token_bytes = Tokenizer.load(tokenizer).token_bytes() if tokenizer.exists() else None
    extra = ("source_ids",) if len(sources) > 1 else ()
    return Evaluation(
        make_eval_step(trainer, max(len(sources), 1)),
        functools.partial(trainer.shard_batch, extra=extra),
        frozen,
        batches,
        cfg.run.eval_batches,
        log,
        sources,
        token_bytes,
    )


def _hooks(cfg: Config, trainer, log, guard, evaluation, saving, export, start: int, mirror) -> list:
    """What runs after a step, in order: the guard's check before anything reads or saves the step's values.
    `mirror`: the run's small files (process 0 only), uploaded with each checkpoint when the run is in a bucket."""
    peak = flops.peak_tflops_per_device(trainer.mesh.size, cfg.run.peak_tflops)
    mfu = functools.partial(
        flops.mfu,
        cfg.model,
        cfg.train.seq_len,
        peak_flops_per_device=peak * 1e12,
        num_devices=trainer.mesh.size,
        lora=cfg.adapters,
    )
    every = cfg.run.log_every
    hooks = [
        *guard.hooks(every),
        Hook(lambda info: log.advance(), every=1, at_end=False),
        Hook(LogMetrics(log, cfg.train.batch_size * cfg.train.seq_len, mfu, start), every=every),
        Hook(
            DocumentsWarning(log, cfg.model.max_segments, attention.resolve(cfg.model.attention) == "cudnn"),
            every=every,
        ),
    ]
    if evaluation is not None:
        hooks.append(Hook(evaluation, every=cfg.run.eval_every))
    hooks += [Hook(saving, every=cfg.checkpoint.every, at_stop=True), Hook(functools.partial(export_params, export))]
    if mirror is not None and cfg.run.plot:
        hooks.append(Hook(functools.partial(plot_curves, mirror.local), at_stop=True))
    if mirror is not None and mirror.remote:
        hooks.append(Hook(lambda info: (log.flush(), mirror.sync()), every=cfg.checkpoint.every, at_stop=True))
    return hooks


def _init_shapes(init, cfg: Config):
    """The parameters `init_from` must hold, as shapes: the frozen base (lora) or the trained parameters."""
    state, frozen = jax.eval_shape(init)
    return frozen if cfg.train.mode == Mode.LORA else state.params


def _initial_state(cfg: Config, trainer, init):
    """(TrainState, frozen): initialised on the mesh, then loaded from `init_from` if set."""
    with jax.set_mesh(trainer.mesh):
        state, frozen = init()
    if cfg.train.init_from:
        state, frozen = _load_initial_params(cfg, trainer, state, frozen)
    return state, frozen


def _load_initial_params(cfg: Config, trainer, state, frozen):
    """Base weights from `init_from`: into the trained parameters (pretrain/sft) or the frozen base (lora)."""
    path = cfg.train.init_from
    if cfg.train.mode == Mode.LORA:
        base = saved_params.load_params(path, frozen, trainer.frozen_shardings)
        return state, base
    params = saved_params.load_params(path, state.params, trainer.state_shardings.params)
    with jax.set_mesh(trainer.mesh):
        opt_state = jax.jit(trainer.tx.init, out_shardings=trainer.state_shardings.opt_state)(params)
    return state._replace(params=params, opt_state=opt_state), frozen
