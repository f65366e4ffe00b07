"""The command line: `info` computes from abstract shapes; `demo` runs end to end."""

import subprocess
import sys

from mellama_jax.cli import main


def test_info_for_70b_allocates_nothing(capsys):
    assert main(["info", "--model", "llama2-70b", "mesh.ici.tensor=2"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 68,976,648,192" in out
    assert "'fsdp': 4, 'tensor': 2" in out


def test_info_reports_bad_config(capsys):
    assert main(["info", "--model", "llama2-70b", "mesh.ici.tensor=3"]) == 2
    assert "error:" in capsys.readouterr().err


def test_demo_runs_the_whole_pipeline(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mellama_jax.cli", "demo", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("1. tokenizer", "2. data", "3. continual pretraining", "4. LoRA instruction tuning",
                  "5. export", "6. transformers"):
        assert stage in result.stdout
    for path in ("pretrain/params", "lora/adapters", "hf/config.json", "hf/model.safetensors",
                 "pretrain/metrics.jsonl", "pretrain/loss.png", "lora/checkpoints"):
        assert (tmp_path / path).exists(), path
    # Without transformers (a plain `pip install`) the demo answers with our own decoder on the base + adapters:
    # the same greedy answers transformers gave from the merged export.
    from mellama_jax.demo import QUESTIONS, _answer_with_mellama

    printed = [line.split("A: ", 1)[1] for line in result.stdout.splitlines() if line.strip().startswith("A: ")]
    ours = _answer_with_mellama(str(tmp_path / "pretrain/params"), str(tmp_path / "lora/adapters"), QUESTIONS)
    assert ours == printed and all(ours), (ours, printed)


def test_a_reader_that_goes_away_is_not_an_error():
    """`mellama-jax info ... | head -1`: the pipe closes before the output is written; no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "mellama_jax.cli", "info", "--model", "llama2-70b"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the command prints
    err = proc.stderr.read().decode()
    assert proc.wait() == 141, err
    assert "Traceback" not in err and "error" not in err, err
