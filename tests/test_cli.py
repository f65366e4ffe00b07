"""The command line: `info` computes from abstract shapes; `demo` runs end to end."""

import subprocess
import sys

import pytest

from mellama_jax.cli import main


def test_info_for_70b_allocates_nothing(capsys):
    assert main(["info", "--model", "llama2-70b", "mesh.ici.tensor=2"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 68,976,648,192" in out
    assert "'fsdp': 4, 'tensor': 2" in out


def test_info_memory_figures_by_hand(capsys):
    """LLaMA2-7B on 8 devices, FSDP over all 8 (the default mesh): every weight has an `embed` axis that FSDP
    shards 8 ways except the 65 norm scales (2 per layer + the final one, 4096 each), which are replicated.
    Parameters 6,738,415,616 in fp32: (6,738,415,616 - 266,240) x 4 / 8 + 266,240 x 4 = 3,370,139,648 bytes =
    3.139 GiB per device; with fp32 gradients and two Adam moments laid out alike, x 4 = 12.555 GiB."""
    assert main(["info", "--model", "llama2-7b"]) == 0
    out = capsys.readouterr().out
    per_device = (6_738_415_616 - 266_240) * 4 / 8 + 266_240 * 4
    assert f"parameters {per_device / 2**30:.3f} GiB" in out and "parameters 3.139 GiB" in out
    assert f"Adam moments {4 * per_device / 2**30:.3f} GiB" in out and "12.555 GiB" in out


def test_info_reports_bad_config(capsys):
    assert main(["info", "--model", "llama2-70b", "mesh.ici.tensor=3"]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.slow  # 2 minutes, and `make demo` runs the same pipeline; `make test-all` runs it
def test_demo_runs_the_whole_pipeline(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mellama_jax.cli", "demo", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in (
        "1. tokenizer",
        "2. data",
        "3. continual pretraining",
        "4. LoRA instruction tuning",
        "5. export",
        "6. transformers",
    ):
        assert stage in result.stdout
    for path in (
        "pretrain/params",
        "lora/adapters",
        "hf/config.json",
        "hf/model.safetensors",
        "pretrain/metrics.jsonl",
        "pretrain/loss.png",
        "lora/checkpoints",
    ):
        assert (tmp_path / path).exists(), path
    # Without transformers (a plain `pip install`) the demo answers with our own decoder on the base + adapters:
    # the same greedy answers transformers gave from the merged export.
    from mellama_jax.demo import QUESTIONS, _answer_with_mellama

    printed = [line.split("A: ", 1)[1] for line in result.stdout.splitlines() if line.strip().startswith("A: ")]
    ours = _answer_with_mellama(str(tmp_path / "pretrain/params"), str(tmp_path / "lora/adapters"), QUESTIONS)
    assert ours == printed and all(ours), (ours, printed)


def test_a_reader_that_goes_away_is_not_an_error():
    """`mellama-jax info ... | head -1`: the pipe closes before the output is written; no traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mellama_jax.cli", "info", "--model", "llama2-70b"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader is gone before the command prints
    err = proc.stderr.read().decode()
    assert proc.wait() == 141, err
    assert "Traceback" not in err and "error" not in err, err


def test_generate_takes_temperature_zero_as_greedy():
    """`--temperature 0` is greedy decoding, as its help says (the default), not a usage error; below 0 is."""
    import pytest

    from mellama_jax.cli import build_parser

    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", "--temperature", "0"])
    assert args.temperature == 0.0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", "--temperature", "-0.5"])


def test_every_command_lists_the_options_it_had():
    """Each command's options (flags, help, choices, defaults as parsed, how the type reads sample texts) equal the
    snapshot taken before the parser was derived from the request dataclasses (tests/cli_options.py)."""
    import json
    from pathlib import Path

    from cli_options import current

    expected = json.loads((Path(__file__).parent / "snapshots" / "cli_options.json").read_text())
    got = json.loads(json.dumps(current()))  # the same JSON types as the file
    assert sorted(got) == sorted(expected)
    for command in expected:
        want, have = expected[command], got[command]
        about = {k: v for k, v in have.items() if k != "options"}
        assert about == {k: v for k, v in want.items() if k != "options"}, command
        assert [o["dest"] for o in have["options"]] == [o["dest"] for o in want["options"]], command
        for a, b in zip(have["options"], want["options"]):
            assert a == b, f"{command} {a['flags'] or a['dest']}"


def test_a_missing_extra_is_named_in_one_line(monkeypatch, capsys):
    """A plain install has no transformers (the interop extra): a command that needs it says which extra to install,
    in one line, exit 2, no traceback."""
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` meets without the extra
    assert main(["bench", "decode", "--model", "tiny", "--batches", "1", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "transformers" in err and "pip install 'mellama-jax[interop]'" in err
