"""JAX's persistent compilation cache, on by default for the commands that compile (train, eval, generate, demo).

A second run with the same model, shapes and devices loads its compiled programs from disk instead of compiling
them again (docs/benchmarks.md: "Compilation cache"). The directory is $MELLAMA_COMPILE_CACHE if set ("off"
turns the cache off), else JAX's own JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME/mellama-jax/jax
(~/.cache/mellama-jax/jax). The cache never changes results: an entry is a compiled program keyed by its HLO,
compile options, devices and jax/jaxlib versions.

Several processes may share one directory. JAX (jax/_src/lru_cache.py) writes an entry with a plain write, not
a rename; with a size limit set, as here, it takes a file lock (`filelock`, released by the OS if its holder
dies) around every read and write, so no process reads an entry another is still writing. In a multi-process
job only process 0 writes. An entry left half-written by a killed process fails to load: JAX warns and
compiles instead (deleting the directory clears it).
"""

from __future__ import annotations

import os
from pathlib import Path

COMMANDS = frozenset({"train", "eval", "generate", "demo"})
MAX_BYTES = 16 * 2**30  # least recently used entries go beyond this (and the limit turns JAX's file lock on)


def directory(environ=os.environ) -> Path | None:
    """Where the cache lives, or None when it is off."""
    value = environ.get("MELLAMA_COMPILE_CACHE", "").strip()
    if value.lower() == "off":
        return None
    if value:
        return Path(value).expanduser()
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(environ["JAX_COMPILATION_CACHE_DIR"]).expanduser()
    base = environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mellama-jax" / "jax"


def enable(command: str) -> Path | None:
    """Turns the cache on for `command` (before JAX compiles anything); returns its directory or None."""
    path = directory() if command in COMMANDS else None
    if path is None:
        return None
    import jax  # here: cli.py imports this module, and `--help` should not wait for JAX

    jax.config.update("jax_compilation_cache_dir", str(path))
    # JAX's defaults skip programs that compile in under a second, which is most of them on a CPU.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path
