"""Every command's options as data: what `--help` lists (flags, help text, choices, whether required) and what each
option holds when it is not given. tests/test_cli.py compares this with tests/snapshots/cli_options.json, taken from
the parser before it was derived from the request dataclasses, so moving the declarations changed no option.

Regenerate only for an intended change of the command line:
    python tests/cli_options.py > tests/snapshots/cli_options.json
"""

from __future__ import annotations

import argparse
import json


def _parsed_default(action):
    """What argparse hands the command when the option is not given."""
    if action.nargs == "*" and action.default is None and not action.option_strings:
        value = []
    elif isinstance(action.default, str) and action.type is not None:
        value = action.type(action.default)
    else:
        value = action.default
    return repr(tuple(value) if isinstance(value, list) else value)


PROBES = ("-1", "0", "0.5", "1", "2,3", "auto,1", "5GB", "a=1;b=2", "x y")


def _typed(action) -> dict | None:
    """How the option's type reads sample texts: its validation as data (the value, or the kind of error)."""
    if action.type is None:
        return None
    out = {}
    for text in PROBES:
        try:
            out[text] = repr(action.type(text))
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            out[text] = f"error: {e}"
    return out


def _options(parser: argparse.ArgumentParser) -> list[dict]:
    rows = []
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        rows.append(
            {
                "flags": list(a.option_strings),
                "dest": a.dest,
                "default": _parsed_default(a),
                "help": a.help,
                "choices": sorted(map(str, a.choices)) if a.choices else None,
                "required": a.required,
                "nargs": a.nargs,
                "metavar": a.metavar,
                "action": type(a).__name__,
                "const": repr(a.const),
                "type": _typed(a),
            }
        )
    return sorted(rows, key=lambda r: (r["flags"], r["dest"]))


def snapshot(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict:
    """{"cmd sub": {"help": ..., "options": [...]}} for every command reachable from `parser`."""
    out = {}
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in a._choices_actions}
            for name, sub in a.choices.items():
                out[" ".join(path + (name,))] = {
                    "help": helps.get(name),
                    "prog": sub.prog,
                    "epilog": sub.epilog,
                    "description": sub.description,
                    "options": _options(sub),
                }
                out.update(snapshot(sub, path + (name,)))
    return out


def current() -> dict:
    from mellama_jax.cli import build_parser

    return snapshot(build_parser())


if __name__ == "__main__":
    print(json.dumps(current(), indent=1, sort_keys=True))
