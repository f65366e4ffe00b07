"""The exit status of a command that tries several layouts."""

from __future__ import annotations

import sys


def all_failed(rows: list[dict]) -> int:
    """Exit status 1 when no layout could be built (each row says why), 0 otherwise."""
    if rows and all("error" in r for r in rows):
        print(f"error: every layout failed (first: {rows[0]['error']})", file=sys.stderr)
        return 1
    return 0
