"""The package as users install it: a wheel built from this tree, in a fresh venv, run outside any checkout.

The venv gets the wheel alone (no -e, no source tree on sys.path); its dependencies come from the test venv's
site-packages through a .pth line, so nothing is downloaded. Presets, recipes and demo data must come from the
wheel itself.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("install")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(root / "dist"),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next((root / "dist").glob("mellama_jax-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    deps = [p for p in site.getsitepackages() if "site-packages" in p] or [sysconfig.get_paths()["purelib"]]
    Path(purelib, "test-deps.pth").write_text("\n".join(deps) + "\n")
    return venv, root


def _run(venv: Path, cwd: Path, *args: str, timeout: int = 600) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MELLAMA_CONFIGS")}
    result = subprocess.run(
        [str(venv / "bin" / "mellama-jax"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_wheel_runs_outside_the_checkout(installed, demo_data):
    venv, root = installed
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import mellama_jax; print(mellama_jax.__file__)"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(venv) in where and str(ROOT) not in where
    # LLaMA2-13B: 40 x (4 x 5120^2 + 3 x 5120 x 13824 + 2 x 5120) + 2 x 32000 x 5120 + 5120 = 13,015,864,320
    assert "parameters: 13,015,864,320" in _run(venv, root, "info", "--model", "llama2-13b")
    plan = _run(
        venv,
        root,
        "plan",
        "--config",
        "me-llama-13b-pretrain",
        "--devices",
        "1",
        "model.num_layers=1",
        "model.hidden_size=64",
        "model.intermediate_size=128",
        "model.num_heads=2",
        "model.num_kv_heads=2",
        "model.vocab_size=256",
        "train.batch_size=16",
        "train.seq_len=32",
        "mesh.ici.fsdp=1",
        "mesh.dcn.data=1",
    )
    assert "| config |" in plan and "yes" in plan
    _run(
        venv,
        root,
        "train",
        "--config",
        "tiny-pretrain",
        f"data.path={demo_data / 'pre'}",
        f"run.dir={root / 'run'}",
        "train.steps=3",
        "run.progress=false",
        "run.plot=false",
        "mesh.ici.data=1",
    )
    assert (root / "run" / "params").is_dir() and (root / "run" / "tokenizer.model").exists()
