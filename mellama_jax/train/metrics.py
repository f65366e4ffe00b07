"""Training metrics: console progress bar with ETA, a JSONL file, TensorBoard events.

Only process 0 writes; the others construct a silent logger so the loop has no branches.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm


class MetricsLogger:
    def __init__(
        self,
        run_dir: str | Path,
        total_steps: int,
        start_step: int,
        enabled: bool,
        progress: bool,
        tensorboard: bool = True,
    ):
        self.enabled = enabled
        self.file = self.tb = self.bar = None
        self.total, self.verbose = total_steps, progress
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / "metrics.jsonl", "a")
        if tensorboard:
            # here, not at the top: tensorboardX imports torch where it is installed (a second)
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        # disable=None: a bar on a terminal only; logs and pipes get one plain line per log step instead.
        self.bar = tqdm(
            total=total_steps, initial=start_step, unit="step", disable=None if progress else True, dynamic_ncols=True
        )

    def log(self, step: int, metrics: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{kind}/{k}", float(v), step)
        if kind == "train":
            shown = {
                k: f"{float(metrics[k]):.4g}"
                for k in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "step_time_s", "mfu")
                if k in metrics
            }
            if self.bar is not None and not self.bar.disable:
                self.bar.set_postfix(shown, refresh=False)
            elif self.verbose:
                print(f"step {step}/{self.total}: " + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)
        elif kind == "eval":
            self.message(f"step {step}: eval loss {float(metrics['loss']):.4f}")

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        for thing in (self.bar, self.tb, self.file):
            if thing is not None:
                thing.close()
