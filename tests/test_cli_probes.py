"""Every command against bad and surprising input, as real subprocesses on tiny data.

Each probe asserts the exit code, that a failure says one line naming the right thing (no traceback), and that no
file outside the command's own fresh output changed (checksums of the whole workspace before and after).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mellama_jax.config import CONFIG_ROOT, load_config


def _train(config: str, overrides: list[str]) -> dict:
    from mellama_jax.train.loop import train

    return train(load_config(CONFIG_ROOT / config, overrides + ["run.progress=false", "run.plot=false"]))


@pytest.fixture(scope="module")
def ws(tmp_path_factory, demo_data):
    """A workspace: a finished pretrain run, a LoRA run on it, its HF export, parameters of another model size
    (no tokenizer), a folder of the user's notes, and a few bad inputs."""
    from conftest import hf_tiny_config
    from transformers import LlamaForCausalLM

    from mellama_jax.convert.api import ExportRequest, ImportRequest, hf_to_jax, jax_to_hf

    root = tmp_path_factory.mktemp("ws")
    _train("tiny-pretrain.yaml", [f"data.path={demo_data / 'pre'}", f"run.dir={root / 'run'}", "train.steps=2"])
    _train(
        "tiny-lora.yaml",
        [
            f"data.path={demo_data / 'ins'}",
            f"run.dir={root / 'lora'}",
            "train.steps=2",
            f"train.init_from={root / 'run' / 'params'}",
        ],
    )
    jax_to_hf(ExportRequest(root / "run" / "params", root / "hf", dtype="float32"), progress=False)
    LlamaForCausalLM(hf_tiny_config(2)).save_pretrained(root / "hf_other")
    hf_to_jax(ImportRequest(root / "hf_other", root / "other_params"), progress=False)
    (root / "notes").mkdir()
    (root / "notes" / "notes.txt").write_text("the user's own file\n")
    (root / "empty.jsonl").write_text("")
    (root / "docs.jsonl").write_text(
        "".join(json.dumps({"body": f"document {i} about statins"}) + "\n" for i in range(5))
    )
    (root / "bad.yaml").write_text("model: [unclosed\n")
    (root / "afile").write_text("not a folder\n")
    (root / "pickled").mkdir()
    (root / "pickled" / "config.json").write_text((root / "hf_other" / "config.json").read_text())
    (root / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x02not really a pickle")
    shutil.copytree(demo_data / "pre", root / "pre")
    shutil.copytree(demo_data / "ins", root / "ins")
    shutil.copy(demo_data / "tok" / "tokenizer.model", root / "tokenizer.model")
    return root


def _tree(root: Path, skip: Path | None) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


def run_cli(ws: Path, argv: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    argv = [a.replace("WS", str(ws)) for a in argv]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "mellama_jax.cli", *argv],
        cwd=ws,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, mentions: tuple[str, ...]) -> None:
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    for text in mentions:
        assert text in errors[0], (text, errors[0])


R = "WS/run"
TRAIN = ["train", "--config", str(CONFIG_ROOT / "tiny-pretrain.yaml")]
# (id, argv, exit code, what the one error line must mention, the command's fresh output (may change))
PROBES = [
    # data loss
    ("export-into-user-folder", ["convert", "jax-to-hf", f"{R}/params", "WS/notes"], 2, ("notes", "not empty")),
    (
        "export-over-user-folder",
        ["convert", "jax-to-hf", f"{R}/params", "WS/notes", "--overwrite"],
        2,
        ("notes", "did not write"),
    ),
    ("export-into-the-run", ["convert", "jax-to-hf", f"{R}/params", R], 2, ("overlap",)),
    ("export-over-the-run", ["convert", "jax-to-hf", f"{R}/params", R, "--overwrite"], 2, ("overlap",)),
    ("import-into-user-folder", ["convert", "hf-to-jax", "WS/hf", "WS/notes"], 2, ("not empty",)),
    ("import-inside-its-source", ["convert", "hf-to-jax", "WS/hf", "WS/hf/sub"], 2, ("overlap",)),
    (
        "resume-with-another-model",
        TRAIN + ["data.path=WS/pre", f"run.dir={R}", "train.steps=2", "model.preset=tiny-gqa"],
        2,
        ("run.dir", "model.num_kv_heads"),
    ),
    (
        "resume-with-another-lr",
        TRAIN + ["data.path=WS/pre", f"run.dir={R}", "train.steps=2", "optimizer.learning_rate=1e-4"],
        2,
        ("optimizer.learning_rate",),
    ),
    (
        "resume-with-another-mixture",
        TRAIN
        + [
            "data.path=WS/pre",
            f"run.dir={R}",
            "train.steps=2",
            "data.mixture={biomedical: 1, clinical: 1, general: 1}",
        ],
        2,
        ("run.dir", "data.mixture.biomedical"),
    ),
    (
        "train-into-user-folder",
        TRAIN + ["data.path=WS/pre", "run.dir=WS/notes", "train.steps=2"],
        2,
        ("run.dir", "notes"),
    ),
    (
        "train-run-dir-is-a-file",
        TRAIN + ["data.path=WS/pre", "run.dir=WS/afile", "train.steps=2"],
        2,
        ("afile", "not a folder"),
    ),
    (
        "train-bad-init-from",
        TRAIN + ["data.path=WS/pre", "run.dir=WS/new-run", "train.init_from=WS/nope"],
        2,
        ("init_from", "nope"),
    ),
    ("train-pretrain-on-instructions", TRAIN + ["data.path=WS/ins", "run.dir=WS/new-run"], 2, ("data.path",)),
    ("demo-into-user-folder", ["demo", "--out", "WS/notes"], 2, ("notes",)),
    # silent wrong results
    (
        "eval-limit-negative",
        ["eval", "--task", "pubmedqa", "--data", "x", "--model", "y", "--out", "z", "--limit", "-1"],
        2,
        ("--limit",),
    ),
    (
        "eval-limit-zero",
        ["eval", "--task", "pubmedqa", "--data", "x", "--model", "y", "--out", "z", "--limit", "0"],
        2,
        ("--limit",),
    ),
    (
        "export-without-tokenizer",
        ["convert", "jax-to-hf", "WS/other_params", "WS/new-hf"],
        2,
        ("tokenizer", "--tokenizer"),
    ),
    ("plan-zero-devices", ["plan", "--model", "tiny", "--devices", "0"], 2, ("--devices",)),
    ("plan-negative-devices", ["plan", "--model", "tiny", "--devices", "-2"], 2, ("--devices",)),
    ("plan-unknown-preset", ["plan", "--model", "nope", "--devices", "1"], 2, ("nope",)),
    ("bench-mesh-negative-devices", ["bench", "mesh", "--model", "tiny", "--devices", "-2"], 2, ("--devices",)),
    (
        "bench-mesh-indivisible",
        ["bench", "mesh", "--model", "tiny", "--devices", "2", "--layouts", "fsdp=3", "--steps", "1", "--warmup", "0"],
        1,
        ("every layout failed",),
    ),
    (
        "generate-negative-temperature",
        ["generate", "--model", f"{R}/params", "--prompt", "x", "--temperature", "-1"],
        2,
        ("--temperature",),
    ),
    (
        "generate-top-p-above-one",
        ["generate", "--model", f"{R}/params", "--prompt", "x", "--top-p", "2"],
        2,
        ("--top-p",),
    ),
    (
        "generate-zero-new-tokens",
        ["generate", "--model", f"{R}/params", "--prompt", "x", "--max-new-tokens", "0"],
        2,
        ("--max-new-tokens",),
    ),
    # misleading messages
    ("generate-missing-model", ["generate", "--model", "WS/nope", "--prompt", "x"], 2, ("nope", "no such")),
    (
        "generate-not-a-params-folder",
        ["generate", "--model", "WS/notes", "--prompt", "x", "--tokenizer", "WS/tokenizer.model"],
        2,
        ("notes", "not a parameter folder"),
    ),
    (
        "generate-missing-tokenizer",
        ["generate", "--model", f"{R}/params", "--prompt", "x", "--tokenizer", "WS/nope.model"],
        2,
        ("nope.model",),
    ),
    ("verify-missing-hf-folder", ["convert", "verify", "WS/nope", f"{R}/params"], 2, ("nope", "no such")),
    (
        "shard-size-not-a-size",
        ["convert", "jax-to-hf", f"{R}/params", "WS/new-hf", "--shard-size", "abc"],
        2,
        ("--shard-size",),
    ),
    (
        "adapters-of-another-size",
        [
            "convert",
            "jax-to-hf",
            "WS/other_params",
            "WS/new-hf",
            "--adapters",
            "WS/lora/adapters",
            "--merge",
            "--tokenizer",
            "WS/tokenizer.model",
        ],
        2,
        ("adapter", "another model size"),
    ),
    (
        "override-named",
        ["info", "--config", str(CONFIG_ROOT / "tiny-pretrain.yaml"), "model.hidden_size=abc"],
        2,
        ("override model.hidden_size", "integer"),
    ),
    # more of our own
    ("info-unknown-preset", ["info", "--model", "llama2-14b"], 2, ("llama2-14b", "known presets")),
    ("train-missing-config", ["train", "--config", "WS/nope.yaml"], 2, ("nope.yaml",)),
    ("train-invalid-yaml", ["train", "--config", "WS/bad.yaml"], 2, ("bad.yaml", "invalid YAML")),
    ("train-unknown-key", TRAIN + ["train.nope=1"], 2, ("train.nope", "unknown key")),
    ("train-override-without-equals", TRAIN + ["train.steps"], 2, ("train.steps", "key=value")),
    ("train-negative-steps", TRAIN + ["train.steps=-3"], 2, ("train.steps",)),
    ("import-missing-source", ["convert", "hf-to-jax", "WS/nope", "WS/new-params"], 2, ("nope",)),
    ("import-pickled-weights", ["convert", "hf-to-jax", "WS/pickled", "WS/new-params"], 2, ("pickle",)),
    ("export-missing-params", ["convert", "jax-to-hf", "WS/nope", "WS/new-hf"], 2, ("nope",)),
    (
        "merge-without-adapters",
        ["convert", "jax-to-hf", f"{R}/params", "WS/new-hf", "--merge"],
        2,
        ("--merge", "--adapters"),
    ),
    ("export-twice", ["convert", "jax-to-hf", f"{R}/params", "WS/hf"], 2, ("hf", "not empty")),
    ("eval-unknown-task", ["eval", "--task", "nope", "--data", "x", "--model", "y", "--out", "z"], 2, ("--task",)),
    (
        "eval-zero-batch",
        ["eval", "--task", "pubmedqa", "--data", "x", "--model", "y", "--out", "z", "--batch-size", "0"],
        2,
        ("--batch-size",),
    ),
    (
        "eval-negative-fewshot",
        ["eval", "--task", "pubmedqa", "--data", "x", "--model", "y", "--out", "z", "--fewshot", "-1"],
        2,
        ("--fewshot",),
    ),
    ("plot-missing-run", ["plot", "WS/nope"], 2, ("nope",)),
    (
        "instruct-missing-input",
        ["prepare", "instruct", "WS/nope.json", "--tokenizer", "WS/tokenizer.model", "--out", "WS/new-ins"],
        2,
        ("nope.json",),
    ),
    (
        "instruct-zero-seq-len",
        [
            "prepare",
            "instruct",
            "WS/docs.jsonl",
            "--tokenizer",
            "WS/tokenizer.model",
            "--out",
            "WS/new-ins",
            "--seq-len",
            "0",
        ],
        2,
        ("--seq-len",),
    ),
    (
        "instruct-no-examples",
        ["prepare", "instruct", "WS/empty.jsonl", "--tokenizer", "WS/tokenizer.model", "--out", "WS/new-ins"],
        2,
        ("empty.jsonl",),
    ),
    (
        "pretrain-missing-tokenizer",
        [
            "prepare",
            "pretrain",
            "--source",
            "biomedical=WS/docs.jsonl",
            "--tokenizer",
            "WS/nope.model",
            "--out",
            "WS/new-pre",
        ],
        2,
        ("nope.model",),
    ),
    (
        "pretrain-source-without-name",
        [
            "prepare",
            "pretrain",
            "--source",
            "WS/docs.jsonl",
            "--tokenizer",
            "WS/tokenizer.model",
            "--out",
            "WS/new-pre",
        ],
        2,
        ("--source",),
    ),
    ("bench-decode-zero-batch", ["bench", "decode", "--model", "tiny", "--batches", "0"], 2, ("--batches",)),
    ("bench-tokenize-no-corpus", ["bench", "tokenize", "--tokenizer", "WS/tokenizer.model"], 2, ("--corpus",)),
    (
        "bench-tokenize-bad-threads",
        ["bench", "tokenize", "--tokenizer", "WS/tokenizer.model", "--corpus", "x", "--threads", "auto,0"],
        2,
        ("--threads",),
    ),
    ("generate-bad-mesh", ["generate", "--model", f"{R}/params", "--prompt", "x", "--mesh", "data"], 2, ("data",)),
]


@pytest.fixture(scope="module")
def probed(ws):
    """Every probe's result, the probes run a few at a time (each is mostly Python and JAX starting up), and the
    workspace's checksums before and after them all."""
    from concurrent.futures import ThreadPoolExecutor

    before = _tree(ws, None)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = dict(zip([p[0] for p in PROBES], pool.map(lambda p: run_cli(ws, p[1]), PROBES)))
    return results, before, _tree(ws, None)


@pytest.mark.parametrize("name,code,mentions", [(p[0], p[2], p[3]) for p in PROBES], ids=[p[0] for p in PROBES])
def test_probe(probed, name, code, mentions):
    result = probed[0][name]
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert_one_line_error(result, mentions)


def test_failed_probes_changed_no_file(probed):
    _, before, after = probed
    assert after == before, sorted(set(after.items()) ^ set(before.items()))[:10]


def test_overwrite_replaces_only_our_own_output(ws):
    """A fresh export, the same again (refused), then --overwrite: only the export's folder changes."""
    out = ws / "hf2"
    before = _tree(ws, out)
    first = run_cli(ws, ["convert", "jax-to-hf", f"{R}/params", str(out), "--dtype", "float32"])
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_cli(ws, ["convert", "jax-to-hf", f"{R}/params", str(out)])
    assert again.returncode == 2 and "--overwrite" in again.stderr
    third = run_cli(ws, ["convert", "jax-to-hf", f"{R}/params", str(out), "--overwrite"])
    assert third.returncode == 0, third.stderr[-2000:]
    assert (out / "tokenizer.model").exists() and (out / "config.json").exists()
    assert not [p for p in ws.iterdir() if p.name.startswith(".hf2")], "temporary folders left behind"
    assert _tree(ws, out) == before
    shutil.rmtree(out)


def test_readme_path_runs_on_a_run_with_no_extra_flags(ws):
    """prepare -> train (the fixture) -> generate -> convert on RUN/params: the run carries its tokenizer."""
    assert (ws / "run" / "tokenizer.model").exists()
    gen = run_cli(ws, ["generate", "--model", f"{R}/params", "--prompt", "Metformin", "--max-new-tokens", "4"])
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.startswith("Metformin")
    lora = run_cli(
        ws,
        [
            "generate",
            "--model",
            f"{R}/params",
            "--adapters",
            "WS/lora/adapters",
            "--prompt",
            "Statins",
            "--max-new-tokens",
            "4",
        ],
    )
    assert lora.returncode == 0, lora.stderr[-2000:]
    (ws / "bionli.jsonl").write_text(
        "".join(
            json.dumps(
                {"premise": f"Statins lower LDL in trial {i}.", "hypothesis": "Statins lower LDL.", "label_cat": "pos"}
            )
            + "\n"
            for i in range(3)
        )
    )
    out = ws / "eval-out"
    ev = run_cli(
        ws,
        [
            "eval",
            "--task",
            "bionli",
            "--data",
            "WS/bionli.jsonl",
            "--model",
            f"{R}/params",
            "--out",
            str(out),
            "--max-new-tokens",
            "4",
        ],
    )
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["examples"] == 3
    again = run_cli(
        ws,
        [
            "eval",
            "--task",
            "bionli",
            "--data",
            "WS/bionli.jsonl",
            "--model",
            f"{R}/params",
            "--out",
            str(out),
            "--max-new-tokens",
            "4",
        ],
    )
    assert again.returncode == 2 and "not empty" in again.stderr  # refused before decoding anything
    shutil.rmtree(out)
    (ws / "bionli.jsonl").unlink()
    saved = yaml.safe_load((ws / "run" / "config.yaml").read_text())
    assert saved["model"]["num_kv_heads"] == load_config(CONFIG_ROOT / "tiny-pretrain.yaml").model.num_kv_heads


@pytest.mark.slow  # 100 s of two conversions and verifies; the verify and export tests cover the pieces
def test_release_and_import_scripts(ws, tmp_path):
    """convert/: a run to a verified HF release (full, and LoRA as PEFT adapter + merged), and back."""
    repo = Path(__file__).resolve().parents[1]
    shellcheck = Path(sys.executable).parent / "shellcheck"
    checked = subprocess.run(
        [str(shellcheck), *map(str, sorted((repo / "convert").glob("*.sh")))], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout
    env = dict(os.environ, MELLAMA=str(Path(sys.executable).parent / "mellama-jax"), PYTHON=sys.executable)

    def script(name, *args):
        result = subprocess.run(
            ["bash", str(repo / "convert" / name), *map(str, args)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    assert '"ok": true' in script("release.sh", ws / "run", tmp_path / "full", "--dtype", "float32")
    assert '"ok": true' in script("release.sh", ws / "lora", tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").exists()
    assert '"ok": true' in script("import.sh", tmp_path / "full", tmp_path / "back")
