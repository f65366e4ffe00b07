"""The training loop's concerns, one hook each, and the schedule that calls them.

After every step the loop builds a `StepInfo` and `run_hooks` calls each hook that is due, in list order. A
hook is a function of `StepInfo` with its own cadence, as in Levanter's `Trainer.add_hook(fn, every=n)`: after
each step that is a multiple of `every`, after the run's last step (`at_end`), and after the step at which a
signal stops the run early (`at_stop`). State a hook needs between calls (when it last logged, which step it
last saved) lives in that hook's object, never in the loop.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jax.experimental import multihost_utils

from mellama_jax import saved_params
from mellama_jax.plot import plot_run
from mellama_jax.train import checkpoint


@dataclasses.dataclass(frozen=True)
class StepInfo:
    step: int  # steps completed
    state: Any  # the TrainState after `step` steps
    metrics: dict | None  # the step's metrics, device scalars; None when a resumed run had no step left to run
    last: bool  # the run's last step
    stopping: bool  # a signal ends the run after this step


@dataclasses.dataclass(frozen=True)
class Hook:
    fn: Callable[[StepInfo], Any]
    every: int = 0  # after each step that is a multiple of this; 0: never on a cadence
    at_end: bool = True  # after the run's last step
    at_stop: bool = False  # after the step at which a signal stops the run

    def due(self, info: StepInfo) -> bool:
        stepped = info.metrics is not None
        return (
            (stepped and self.every > 0 and info.step % self.every == 0)
            or (self.at_end and info.last)
            or (self.at_stop and info.stopping)
        )


def run_hooks(hooks: Sequence[Hook], info: StepInfo) -> None:
    for hook in hooks:
        if hook.due(info):
            hook.fn(info)


class NonFiniteLoss(RuntimeError):
    pass


class NoTargets(NonFiniteLoss):
    """A step whose batch holds no token with loss weight: its loss is no number, and the data say why."""


class FiniteGuard:
    """Stops the run at the first step whose loss or gradient norm is NaN or infinite, or, where the step skips
    such updates (`skipped` in its metrics), at the `max_skipped`-th skipped step in a row.

    Reading a value to the host waits for its step to finish, so `record` (every step) only keeps the device
    scalars, and `check` reads all of them at once: on its own cadence, and before every save (`Checkpointing`
    calls it), so nothing from a non-finite step is ever saved (a skipped step's state is the one before it).
    """

    def __init__(self, last_saved: Callable[[], int | None], max_skipped: int = 1):
        self.last_saved, self.max_skipped = last_saved, max_skipped
        self.unchecked: list[tuple[int, dict]] = []
        self.skipped_in_a_row: list[int] = []
        self.skipped_total = 0

    def record(self, info: StepInfo) -> None:
        self.unchecked.append((info.step, info.metrics))

    def check(self, info: StepInfo | None = None) -> None:
        for step, metrics in self.unchecked:
            if "tokens" in metrics and float(metrics["tokens"]) == 0:
                raise NoTargets(
                    f"step {step}: its batch holds no target token (every loss weight is 0: the "
                    "prompts fill train.seq_len, or the data hold no responses); stopped without "
                    f"saving: {self._kept()}"
                )
            loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
            if int(metrics.get("skipped", 0)):
                self.skipped_total += 1
                self.skipped_in_a_row.append(step)
                if len(self.skipped_in_a_row) >= self.max_skipped:
                    first = self.skipped_in_a_row[0]
                    raise NonFiniteLoss(
                        f"non-finite loss at steps {first}-{step}: {len(self.skipped_in_a_row)} "
                        f"in a row, each skipped (train.max_skipped_steps={self.max_skipped}); "
                        f"stopped: {self._kept()}"
                    )
                continue
            self.skipped_in_a_row = []
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise NonFiniteLoss(
                    f"non-finite loss at step {step} (loss={loss}, grad_norm={grad_norm}); "
                    f"stopped without saving: {self._kept()}"
                )
        self.unchecked.clear()

    def _kept(self) -> str:
        saved = self.last_saved()
        return (
            "no checkpoint had been saved yet"
            if saved is None
            else f"the last good checkpoint (step {saved}) is untouched"
        )

    def hooks(self, every: int) -> list[Hook]:
        return [Hook(self.record, every=1, at_end=False), Hook(self.check, every=every)]


class LogMetrics:
    """One metrics line: the step's metrics, tokens/s and step time since the previous line, and MFU."""

    def __init__(
        self,
        log,
        tokens_per_step: int,
        mfu: Callable[[float], float],
        start_step: int,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.log, self.tokens_per_step, self.mfu, self.clock = log, tokens_per_step, mfu, clock
        self.since = (clock(), start_step)

    def __call__(self, info: StepInfo) -> None:
        if info.metrics is None:
            return
        host = {k: float(v) for k, v in info.metrics.items()}  # waits for the step: the clock reads after it
        then, then_step = self.since
        elapsed = self.clock() - then
        rate = self.tokens_per_step * (info.step - then_step) / elapsed
        host.update(tokens_per_s=rate, step_time_s=elapsed / (info.step - then_step), mfu=self.mfu(rate))
        self.log.log(info.step, host)
        self.since = (self.clock(), info.step)


class DocumentsWarning:
    """Says once per run that a row held more documents than `model.max_segments` (cuDNN's packed layout)."""

    def __init__(self, log, max_segments: int, enabled: bool):
        self.log, self.max_segments, self.pending = log, max_segments, enabled

    def __call__(self, info: StepInfo) -> None:
        if not self.pending or info.metrics is None:
            return
        documents = float(info.metrics["documents_per_row_max"])
        if documents > self.max_segments:
            self.pending = False
            self.log.message(
                f"step {info.step}: a row holds {int(documents)} documents, more than "
                f"model.max_segments={self.max_segments}: such batches take cuDNN's masked attention "
                f"kernel, ~10% slower per step at 7B (docs/benchmarks.md); a larger max_segments "
                f"avoids that"
            )


class Evaluation:
    """The held-out loss, logged as an `eval` line: `loss` over all held-out tokens and, with several sources,
    `loss/NAME` per source; `bpb` (and `bpb/NAME`), bits per byte of the held-out text, where the tokenizer's
    byte lengths are given, so that runs with other tokenizers compare. `last` holds the latest values, `first`
    (with `first_step`) those of the first evaluation: at step 0, the model before training (forgetting probe).

    The same batches every time (the first `max_batches`); each source's tokens are pooled over them, not a mean
    of batch means."""

    def __init__(
        self,
        eval_fn,
        shard_batch,
        frozen,
        batches,
        max_batches: int,
        log,
        sources: tuple[str, ...] = (),
        token_bytes: np.ndarray | None = None,
    ):
        self.eval_fn, self.shard_batch, self.frozen, self.log = eval_fn, shard_batch, frozen, log
        self.batches, self.count = batches, min(len(batches), max_batches)
        self.sources = tuple(sources)
        self.bytes = None if token_bytes is None else self._held_out_bytes(token_bytes)
        self.first = self.first_step = self.last = None

    def _held_out_bytes(self, token_bytes: np.ndarray) -> np.ndarray:
        """UTF-8 bytes of the predicted tokens, per source (all in one when there is one)."""
        sizes = np.zeros(max(len(self.sources), 1))
        for k in range(self.count):
            batch = self.batches[k]
            counted = token_bytes[batch["targets"]] * (batch["loss_weights"] > 0)
            source = batch["source_ids"] if len(self.sources) > 1 else np.zeros_like(batch["targets"])
            np.add.at(sizes, source.ravel(), counted.ravel())
        return sizes

    def values(self, params) -> dict:
        ce = weight = 0.0
        for k in range(self.count):
            c, w = self.eval_fn(params, self.frozen, self.shard_batch(self.batches[k]))
            ce, weight = ce + np.asarray(c, np.float64), weight + np.asarray(w, np.float64)
        out = {"loss": float(ce.sum() / max(weight.sum(), 1.0))}
        if self.bytes is not None:
            out["bpb"] = float(ce.sum() / math.log(2) / max(self.bytes.sum(), 1.0))
        if len(self.sources) > 1:
            for s, name in enumerate(self.sources):
                out[f"loss/{name}"] = float(ce[s] / max(weight[s], 1.0))
                if self.bytes is not None:
                    out[f"bpb/{name}"] = float(ce[s] / math.log(2) / max(self.bytes[s], 1.0))
        return out

    def __call__(self, info: StepInfo) -> None:
        self.last = self.values(info.state.params)
        if self.first is None:
            self.first, self.first_step = self.last, info.step
        self.log.log(info.step, self.last, "eval")

    def summary(self) -> dict:
        """The last values; from a run evaluated before its first step, each one's change since then (a rise of
        the general source's loss is forgetting)."""
        if self.last is None:
            return {}
        out = {"held_out": self.last}
        if self.first_step == 0:
            out["held_out_at_step_0"] = self.first
            out["held_out_change"] = {k: self.last[k] - self.first[k] for k in self.last}
        return out


class Checkpointing:
    """Saves the train state with the data iterator's position (at most once per step), after `vet` (the
    non-finite guard's check) has passed."""

    def __init__(self, mngr, iterator, meta: dict, saved_step: int | None, vet: Callable[[], None]):
        self.mngr, self.iterator, self.meta, self.saved_step, self.vet = mngr, iterator, meta, saved_step, vet

    def __call__(self, info: StepInfo) -> None:
        if info.step == self.saved_step:
            return
        self.vet()
        checkpoint.save(self.mngr, info.step, info.state, self.iterator, dict(self.meta, step=info.step))
        self.saved_step = info.step


def export_params(path: Path, info: StepInfo) -> None:
    """The trained parameters alone (what `init_from` and the converters read)."""
    saved_params.save_params(path, info.state.params)


def plot_curves(run_dir: Path, info: StepInfo) -> None:
    plot_run(run_dir)


class StopOnSignal:
    """SIGTERM or SIGINT (a scheduler's preemption notice, Ctrl-C) asks the run to stop after the current step;
    all processes stop at the same step if any of them was signalled. The previous handlers come back on exit.

    With several processes the decision needs a collective, which waits for the step to finish on every host; it
    is taken only after every `every`-th step (the steps that log, whose metrics the host reads anyway), so the
    other steps are queued without waiting. All processes count the same steps, so they agree where to stop."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, process_count: int = 1, every: int = 1, start: int = 0):
        self.process_count, self.every, self.received = process_count, max(every, 1), None
        self.step, self.collectives = start, 0

    def __enter__(self) -> StopOnSignal:
        self.previous = {s: signal.signal(s, self._receive) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _receive(self, number, frame) -> None:
        self.received = signal.Signals(number).name

    def requested(self) -> bool:
        """Called once after each step."""
        self.step += 1
        local = self.received is not None
        if self.process_count == 1:
            return local
        if self.step % self.every:
            return False

        self.collectives += 1
        return bool(np.any(multihost_utils.process_allgather(np.array([local]))))

    @property
    def reason(self) -> str:
        return self.received or "another process"
