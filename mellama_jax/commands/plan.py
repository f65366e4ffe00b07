"""plan (and plan --search, --calibrate)."""

from __future__ import annotations

import json

from mellama_jax.bench.calibrate import calibrate
from mellama_jax.commands.printing import all_failed
from mellama_jax.options import command
from mellama_jax.plan import layouts, search
from mellama_jax.plan.layouts import PlanRequest


@command(PlanRequest)
def plan(r: PlanRequest) -> int:
    if r.search:
        result = search.search(r)
        if r.calibrate:
            result["calibration"] = calibrate(result, r.config, search.request_overrides(r), r.calibrate)
        print(json.dumps(result, indent=1) if r.json else search.markdown(result))
        return 0 if result["fits"] else 1
    run, table = (layouts.plan_tpu, layouts.markdown_tpu) if r.target == "tpu" else (layouts.plan, layouts.markdown)
    result = run(r)
    print(layouts.report(result, table))
    return all_failed(result["layouts"])
