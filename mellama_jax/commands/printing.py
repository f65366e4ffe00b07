"""How commands report: a result as JSON on stdout, and the exit status of one that tries several layouts."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from mellama_jax.options import command


def print_json(result: dict) -> int:
    print(json.dumps(result, indent=1))
    return 0


def json_command(request: type, run: Callable[..., dict]) -> Callable:
    """The command that prints `run(request)` as JSON and exits 0."""
    return command(request)(lambda r: print_json(run(r)))


def all_failed(rows: list[dict]) -> int:
    """Exit status 1 when no layout could be built (each row says why), 0 otherwise."""
    if rows and all("error" in r for r in rows):
        print(f"error: every layout failed (first: {rows[0]['error']})", file=sys.stderr)
        return 1
    return 0
