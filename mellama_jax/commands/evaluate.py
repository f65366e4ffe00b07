"""generate, eval, eval score."""

from __future__ import annotations

from mellama_jax.commands.printing import print_json
from mellama_jax.eval.rescore import RescoreRequest, rescore
from mellama_jax.eval.run import EvalRequest, GenerateRequest, complete, evaluate
from mellama_jax.options import command


@command(GenerateRequest)
def generate(r: GenerateRequest) -> int:
    for prompt, text in zip(r.prompt, complete(r)):
        print(prompt + text)
    return 0


@command(
    EvalRequest,
    epilog="mellama-jax eval score --task T --predictions predictions.jsonl --out DIR: score an "
    "earlier run's outputs again (see `eval score --help`)",
)
def evaluation(r: EvalRequest) -> int:
    return print_json(evaluate(r))


# `eval score ...` is rewritten to `eval-score ...` in cli.main: `eval`'s own options stay as they were
score = command(RescoreRequest, prog="mellama-jax eval score")(lambda r: print_json(rescore(r)))
