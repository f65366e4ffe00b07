"""The CLI's persistent compilation cache: where it lives, and one folder shared by processes at once."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from mellama_jax import compile_cache

# A process that turns the cache on as the CLI does, waits for a go signal (so that two of them compile and
# write at the same moment), then compiles and runs the same six small programs, counting JAX's cache events.
PROGRAM = r"""
import json, sys, time
from pathlib import Path
from mellama_jax.compile_cache import enable
enable("eval")
import jax, jax.numpy as jnp, numpy as np
events = {"hits": 0, "misses": 0}
def listen(event, **kw):
    for name in events:
        if event == "/jax/compilation_cache/cache_" + name:
            events[name] += 1
jax.monitoring.register_event_listener(listen)
go = Path(sys.argv[1])
(go.parent / f"ready-{sys.argv[2]}").touch()
while not go.exists():
    time.sleep(0.01)
x = np.linspace(0.0, 1.0, 64, dtype=np.float32)
results = [float(jax.jit(lambda v, k=k: jnp.sum(jnp.sin(v * (k + 1)) ** 2))(x)) for k in range(6)]
print(json.dumps({"results": results, **events}))
"""


def expected():
    import numpy as np

    x = np.linspace(0.0, 1.0, 64, dtype=np.float32)
    return [float(np.sum(np.sin(x * (k + 1)) ** 2)) for k in range(6)]


def start(cache: Path, go: Path, name: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device: a quick start
    env.update(MELLAMA_COMPILE_CACHE=str(cache), JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, "-c", PROGRAM, str(go), name],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> tuple[dict, str]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.splitlines()[-1]), err


def test_processes_share_one_cache_folder(tmp_path):
    cache, go = tmp_path / "cache", tmp_path / "go"
    procs = [start(cache, go, str(i)) for i in range(2)]
    deadline = time.time() + 60
    while not all((tmp_path / f"ready-{i}").exists() for i in range(2)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "a process did not start"
        time.sleep(0.01)
    go.touch()  # both compile the same programs and write the same entries at once
    for proc in procs:
        report, _ = finish(proc)
        assert report["results"] == pytest.approx(expected(), rel=1e-5) and report["hits"] + report["misses"] == 6
    entries = sorted(cache.glob("*-cache"))
    assert len(entries) == 6  # each program once, though both processes compiled it
    # A third process reads them all; one entry cut short (as a writer killed mid-write leaves it) is
    # compiled again with a warning, and nothing else changes.
    entries[0].write_bytes(entries[0].read_bytes()[:100])
    report, err = finish(start(cache, go, "warm"))
    assert report["results"] == pytest.approx(expected(), rel=1e-5)
    assert report["hits"] == 5 and "Error reading persistent compilation cache entry" in err


def test_where_the_cache_lives(tmp_path):
    home = Path.home() / ".cache" / "mellama-jax" / "jax"
    assert compile_cache.directory({}) == home
    assert compile_cache.directory({"XDG_CACHE_HOME": "/x"}) == Path("/x/mellama-jax/jax")
    assert compile_cache.directory({"JAX_COMPILATION_CACHE_DIR": "/j", "XDG_CACHE_HOME": "/x"}) == Path("/j")
    assert (
        compile_cache.directory({"MELLAMA_COMPILE_CACHE": str(tmp_path), "JAX_COMPILATION_CACHE_DIR": "/j"}) == tmp_path
    )
    assert compile_cache.directory({"MELLAMA_COMPILE_CACHE": "off", "XDG_CACHE_HOME": "/x"}) is None
    # the test session's own folder, never the user's home (tests/conftest.py)
    assert compile_cache.directory() == Path(os.environ["MELLAMA_COMPILE_CACHE"]) != home


def test_only_commands_that_compile_turn_it_on(monkeypatch, tmp_path):
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
        "jax_compilation_cache_max_size",
    )
    before = {n: getattr(jax.config, n) for n in names}
    monkeypatch.setenv("MELLAMA_COMPILE_CACHE", str(tmp_path))
    try:
        assert compile_cache.enable("info") is None and compile_cache.enable("prepare") is None
        assert jax.config.jax_compilation_cache_dir == before["jax_compilation_cache_dir"]
        assert compile_cache.enable("eval") == tmp_path
        # every program cached, however quick to compile or small; a size limit (which turns JAX's lock on)
        assert [getattr(jax.config, n) for n in names] == [str(tmp_path), 0.0, -1, compile_cache.MAX_BYTES]
    finally:  # nothing compiled in between: this process's cache was never opened
        for n, v in before.items():
            jax.config.update(n, v)
    monkeypatch.setenv("MELLAMA_COMPILE_CACHE", "off")
    assert compile_cache.enable("train") is None
