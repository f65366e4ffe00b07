"""Goodput: the share of a run's wall time that went into steps that count (MaxText's idea), and where the rest
went, from the loop's own host clocks: no device synchronisation is added for it.

The host measures wall time between points it passes anyway: the run's start, the first call of the compiled
step (tracing and compiling happen inside it), each hook that blocks (checkpoint saves, evaluation), the end. The
steps' time is what remains; steps redone after a resume (the previous attempt had logged past the checkpoint it
resumes from) and skipped non-finite steps are charged at the mean step time.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path


@dataclasses.dataclass
class Goodput:
    clock: Callable[[], float] = time.perf_counter
    started: float = 0.0
    spent: dict = dataclasses.field(
        default_factory=lambda: {"startup": 0.0, "compile": 0.0, "checkpoint": 0.0, "evaluation": 0.0}
    )
    loop_started: float | None = None

    def __post_init__(self):
        self.started = self.clock()

    def timed(self, bucket: str, fn: Callable) -> Callable:
        """`fn` with its wall time added to `bucket`."""

        def run(*args, **kw):
            began = self.clock()
            try:
                return fn(*args, **kw)
            finally:
                self.spent[bucket] += self.clock() - began

        return run

    def first_call_compiles(self, step_fn: Callable) -> Callable:
        """The step function, whose first call (trace, compile, dispatch) is charged to compilation; everything
        before it to start-up."""
        calls = []

        def run(*args):
            if not calls:
                calls.append(True)
                self.loop_started = self.clock()
                self.spent["startup"] = self.loop_started - self.started
                return self.timed("compile", step_fn)(*args)
            return step_fn(*args)

        return run

    def report(self, steps_run: int, redone: int, skipped: int) -> dict:
        """Seconds per category and goodput = productive step time / wall time, at the end of the run."""
        wall = self.clock() - self.started
        if self.loop_started is None:  # no step ran
            return {"goodput": 0.0, "wall_s": wall, "startup_s": wall}
        stepping = max(
            0.0,
            self.clock()
            - self.loop_started
            - self.spent["compile"]
            - self.spent["checkpoint"]
            - self.spent["evaluation"],
        )
        per_step = stepping / steps_run if steps_run else 0.0
        lost = {
            "redone_steps": redone,
            "redone_s": per_step * min(redone, steps_run),
            "skipped_steps": skipped,
            "skipped_s": per_step * min(skipped, steps_run),
        }
        productive = max(0.0, stepping - lost["redone_s"] - lost["skipped_s"])
        return {
            "goodput": productive / wall if wall > 0 else 0.0,
            "wall_s": wall,
            "productive_s": productive,
            **{f"{k}_s": v for k, v in self.spent.items()},
            **lost,
        }


def steps_logged_before(metrics_file: str | Path) -> int:
    """The last step an earlier attempt of this run logged (0: none): steps past the checkpoint a resume starts
    from were done before and are done again."""
    try:
        lines = Path(metrics_file).read_text().splitlines()
    except OSError:
        return 0
    last = 0
    for line in lines:
        try:
            last = max(last, int(json.loads(line).get("step", 0)))
        except (ValueError, AttributeError, TypeError):
            continue
    return last


def summary_line(report: dict) -> str:
    if "productive_s" not in report:
        return f"goodput 0% (no step ran; {report['wall_s']:.0f} s)"
    parts = [f"{k[:-2]} {report[k]:.1f} s" for k in ("startup_s", "compile_s", "checkpoint_s", "evaluation_s")]
    if report["redone_steps"]:
        parts.append(f"{report['redone_steps']} steps redone after the resume {report['redone_s']:.1f} s")
    if report["skipped_steps"]:
        parts.append(f"{report['skipped_steps']} skipped steps {report['skipped_s']:.1f} s")
    return f"goodput {100 * report['goodput']:.0f}% of {report['wall_s']:.0f} s (" + ", ".join(parts) + ")"
