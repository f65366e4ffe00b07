"""generate, eval, eval score."""

from __future__ import annotations

import json

from mellama_jax.eval.rescore import RescoreRequest, rescore
from mellama_jax.eval.run import EvalRequest, GenerateRequest, complete, evaluate
from mellama_jax.options import command


@command(GenerateRequest)
def generate(r: GenerateRequest) -> int:
    for prompt, text in zip(r.prompt, complete(r)):
        print(prompt + text)
    return 0


@command(EvalRequest, epilog="mellama-jax eval score --task T --predictions predictions.jsonl --out DIR: score an "
                             "earlier run's outputs again (see `eval score --help`)")
def evaluation(r: EvalRequest) -> int:
    print(json.dumps(evaluate(r), indent=1))
    return 0


# `eval score ...` is rewritten to `eval-score ...` in cli.main: `eval`'s own options stay as they were
@command(RescoreRequest, prog="mellama-jax eval score")
def score(r: RescoreRequest) -> int:
    print(json.dumps(rescore(r), indent=1))
    return 0
