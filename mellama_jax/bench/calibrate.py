"""`plan --search --calibrate N`: the best N candidates that fit, run for a few steps on this host's devices
(`bench mesh`'s timing), predicted against measured step time, and Spearman's rank correlation of the two. The
search ranks them on this host's own figures (`plan.search.host_target`) when asked to calibrate."""

from __future__ import annotations

from tqdm import tqdm

from mellama_jax.bench.timing import jax_step_timing
from mellama_jax.plan.search import Candidate, spearman


def calibrate(result: dict, config, overrides: list[str], k: int, progress: bool = True) -> dict:
    """`result`: what `plan.search.search` returned; its rows as ranked."""
    runs = []
    for row in tqdm([r for r in result["rows"] if r["fits"]][:k], desc="calibrating", disable=not progress):
        run = {**{key: row[key] for key in ("ici", "dcn", "grad_accum", "remat")}, "predicted_s": row["step_s"]}
        candidate = Candidate(row["ici"], row["dcn"], row["grad_accum"], row["remat"])
        try:
            run["measured_s"] = jax_step_timing(
                list(overrides) + candidate.overrides(), warmup=1, steps=3, config=config
            )["step_s_median"]
        except Exception as e:  # one candidate that cannot run (out of memory) is a result, not the search's end
            run["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        runs.append(run)
    timed = [x for x in runs if "measured_s" in x]
    rho = spearman([x["predicted_s"] for x in timed], [x["measured_s"] for x in timed]) if len(timed) > 1 else None
    return {"runs": runs, "spearman": rho}
