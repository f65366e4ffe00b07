"""Command-line options declared once. A command's request is a frozen dataclass whose fields carry their help,
flag and parsing in `option(...)` metadata; `add_options` builds the command's argparse parser from it and
`from_args` the request back, so the options Python callers pass and the ones the command line parses are the same
fields with the same defaults. Also the value types those options share (`POSITIVE`, `sizes`, `layouts`, ...).

Spellings follow from the field: `--max-new-tokens` for `max_new_tokens`; a bool defaulting to False is a switch; a
field without a default is a required option; `positional=True` makes an argument of it."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

MISSING = dataclasses.MISSING


def option(
    default: Any = MISSING,
    help: str | None = None,
    *,
    flag: str | None = None,
    type: Callable | None = None,
    choices=None,
    metavar: str | None = None,
    positional: bool = False,
    nargs: str | None = None,
    append: bool = False,
    collect: Callable | None = None,
) -> Any:
    """A request field that is also a command-line option.

    flag: the spelling when it is not `--field-name` (a bool defaulting to True is then a `--no-...` switch).
    type: reads one command-line text (the field's default is already the parsed value). append: the option may
    repeat, each value added to a list. collect: turns what argparse parsed into the field's value.
    """
    cli = {
        "help": help,
        "flag": flag,
        "type": type,
        "choices": choices,
        "metavar": metavar,
        "positional": positional,
        "nargs": nargs,
        "append": append,
        "collect": collect,
    }
    return dataclasses.field(default=default, metadata={"cli": cli})


def _argument(field: dataclasses.Field) -> tuple[list[str], dict]:
    """argparse's names and keyword arguments for one field."""
    cli = field.metadata["cli"]
    required = field.default is MISSING
    kw = {k: cli[k] for k in ("help", "type", "choices", "metavar", "nargs") if cli[k] is not None}
    if cli["positional"]:
        return [field.name], kw
    kw["dest"] = field.name
    if isinstance(field.default, bool) and cli["type"] is None:
        kw["action"] = "store_false" if field.default else "store_true"
        kw.pop("nargs", None)
    else:
        kw["required"] = required
        kw["default"] = None if required else field.default
    if cli["append"]:
        kw["action"] = "append"
        kw["default"] = list(kw["default"]) if kw["default"] is not None else None  # argparse appends to a list
    return [cli["flag"] or "--" + field.name.replace("_", "-")], kw


def add_options(parser: argparse.ArgumentParser, request: type) -> None:
    """One argparse argument per `option` field of the request dataclass, in field order."""
    for field in dataclasses.fields(request):
        if "cli" in field.metadata:
            names, kw = _argument(field)
            parser.add_argument(*names, **kw)


def from_args(request: type, args: argparse.Namespace):
    """The request from parsed options: lists become tuples (requests are frozen), `collect` applied."""
    values = {}
    for field in dataclasses.fields(request):
        if "cli" not in field.metadata:
            continue
        value = getattr(args, field.name)
        collect = field.metadata["cli"]["collect"]
        if collect is not None:
            value = collect(value)
        elif isinstance(value, list):
            value = tuple(value)
        values[field.name] = value
    return request(**values)


def command(request: type, **parser: Any) -> Callable:
    """Marks `fn(request) -> exit code` as a command taking `request`; `parser`: more argparse.ArgumentParser
    arguments of its parser (epilog, prog, ...)."""

    def mark(fn):
        fn.request, fn.parser = request, parser
        return fn

    return mark


# value types -------------------------------------------------------------------------------------------------------


def number(kind, low=None, high=None, low_open=False):
    """An argparse type: `kind` within [low, high] ((low, high] with low_open), else a usage error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if low is not None and (value <= low if low_open else value < low) or high is not None and value > high:
            lower, upper = low if low is not None else "-inf", high if high is not None else "inf"
            bounds = f"{'(' if low_open else '['}{lower}, {upper}]"
            raise argparse.ArgumentTypeError(f"must lie in {bounds}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE, NON_NEGATIVE = number(int, 1), number(int, 0)
POSITIVE_NUMBER = number(float, 0.0, low_open=True)


def size(text: str) -> int:
    """Bytes from '5GB', '500MB', '1.5GiB' or a plain integer."""
    units = {
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "B": 1,
    }
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            upper, scale = upper[: -len(unit)], factor
            break
    else:
        scale = 1
    try:
        value = int(float(upper) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 5GB or 500MB, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def positive_list(text: str) -> tuple[int, ...]:
    """'1,16' -> (1, 16): comma-separated positive integers."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def threads_list(text: str) -> tuple[int | None, ...]:
    """'auto,1' -> (None, 1): thread counts, auto meaning the command's own default."""
    return tuple(None if t == "auto" else positive_list(t)[0] for t in text.split(","))


def layout_list(text: str) -> tuple[str, ...]:
    """'fsdp=8;fsdp=4,tensor=2' -> ('fsdp=8', 'fsdp=4,tensor=2'): ";"-separated ici layouts."""
    return tuple(layout for layout in text.split(";") if layout)


def name_list(text: str) -> tuple[str, ...]:
    """'full,lora' -> ('full', 'lora')."""
    return tuple(text.split(","))


def word_list(text: str) -> tuple[str, ...]:
    """'a=1 b=2' -> ('a=1', 'b=2'): space-separated config overrides."""
    return tuple(text.split())


def overrides(help: str | None = None) -> Any:
    """The trailing `key=value ...` arguments most commands take."""
    return option((), help, positional=True, nargs="*")
