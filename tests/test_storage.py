"""gs:// buckets (storage.py) against a real storage emulator (conftest's `bucket`): the local cache of fetched
inputs, folder outputs built locally and uploaded, and the commands that read and write them. The training run
in a bucket, killed and resumed by two processes, is in test_multihost.py."""

import json
import time
from pathlib import Path

import pytest
from safetensors.numpy import load_file
from test_convert import all_tensors, make_hf_dir, tokenizer_file  # noqa: F401  (a fixture)

from mellama_jax import storage
from mellama_jax.cli import main


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_fetch_copies_a_folder_once_and_again_only_what_changed(bucket, tmp_path):
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / ".marker.json").write_text("{}")
    (src / "top.bin").write_bytes(b"x" * 1000)
    (src / "a" / "b" / "deep.txt").write_text("deep")
    storage.upload(src, f"{bucket}/fetch/src")
    local = storage.fetch(f"{bucket}/fetch/src")
    assert local == storage.cache_root() / "gs" / "mellama-test" / "fetch" / "src"
    assert tree(local) == tree(src)
    stamps = {p: p.stat().st_mtime_ns for p in local.rglob("*") if p.is_file()}
    assert storage.fetch(f"{bucket}/fetch/src") == local
    assert {p: p.stat().st_mtime_ns for p in local.rglob("*") if p.is_file()} == stamps  # nothing fetched again
    time.sleep(1.1)  # object times have whole seconds
    (src / "top.bin").write_bytes(b"y" * 1000)  # same size, new contents
    storage.upload(src, f"{bucket}/fetch/src", names=["top.bin"])
    storage.fetch(f"{bucket}/fetch/src")
    assert (local / "top.bin").read_bytes() == b"y" * 1000
    assert (local / "a" / "b" / "deep.txt").stat().st_mtime_ns == stamps[local / "a" / "b" / "deep.txt"]


def test_fetch_brings_the_run_files_above_a_parameter_folder(bucket, tmp_path):
    run = tmp_path / "run"
    (run / "params" / "d").mkdir(parents=True)
    (run / "params" / "d" / "chunk").write_bytes(b"0123")
    (run / "config.yaml").write_text("seed: 1\n")
    (run / "tokenizer.model").write_bytes(b"sp")
    (run / "metrics.jsonl").write_text("{}\n")  # not a file that names the model: stays behind
    storage.upload(run, f"{bucket}/context/run")
    local = storage.fetch(f"{bucket}/context/run/params", context=3)
    assert (local / "d" / "chunk").read_bytes() == b"0123"
    assert (local.parent / "config.yaml").read_text() == "seed: 1\n"
    assert (local.parent / "tokenizer.model").read_bytes() == b"sp"
    assert not (local.parent / "metrics.jsonl").exists()


def test_upload_puts_the_marker_last(bucket, tmp_path, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    for name in ("z.txt", ".mellama-output.json", "a.txt"):
        (folder / name).write_text(name)
    written = []
    real_open = type(storage.path(f"{bucket}/x")).open

    def recording_open(self, mode="r", *args, **kwargs):
        if "w" in mode:
            written.append(self.name)
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(type(storage.path(f"{bucket}/x")), "open", recording_open)
    storage.upload(folder, f"{bucket}/order", last=".mellama-output.json")
    assert written[-1] == ".mellama-output.json" and sorted(written) == sorted(p.name for p in folder.iterdir())


def test_convert_reads_from_and_writes_to_a_bucket(bucket, tmp_path, tokenizer_file, capsys):  # noqa: F811
    src = make_hf_dir(tmp_path / "hf", 2, seed=3, tokenizer=tokenizer_file)
    storage.upload(src, f"{bucket}/convert/hf")
    jax_dir, hf_out = f"{bucket}/convert/jax", f"{bucket}/convert/out"
    assert main(["convert", "hf-to-jax", f"{bucket}/convert/hf", jax_dir]) == 0
    assert storage.path(f"{jax_dir}/.mellama-output.json").exists()
    assert main(["convert", "jax-to-hf", jax_dir, hf_out, "--dtype", "float32"]) == 0
    fetched = storage.fetch(hf_out)
    original, exported = all_tensors(src), all_tensors(fetched)
    assert sorted(original) == sorted(exported)
    for name, value in original.items():
        assert (value == exported[name]).all(), name
    assert (fetched / "tokenizer.model").read_bytes() == tokenizer_file.read_bytes()

    capsys.readouterr()
    assert main(["convert", "jax-to-hf", jax_dir, hf_out, "--dtype", "float32"]) == 2  # an output is not replaced
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{hf_out}: exists and is not empty" in err[0]
    assert main(["convert", "jax-to-hf", jax_dir, hf_out, "--dtype", "bfloat16", "--overwrite"]) == 0
    assert {str(v.dtype) for v in all_tensors(storage.fetch(hf_out)).values()} == {"bfloat16"}
    assert main(["convert", "hf-to-jax", f"{bucket}/convert/hf", hf_out, "--overwrite"]) == 2  # another kind


def test_a_failed_output_leaves_nothing_in_the_bucket(bucket, tmp_path, tokenizer_file, capsys):  # noqa: F811
    src = make_hf_dir(tmp_path / "hf", 2, seed=4, tokenizer=tokenizer_file)
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    from safetensors.numpy import save_file

    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    storage.upload(src, f"{bucket}/broken/hf")
    assert main(["convert", "hf-to-jax", f"{bucket}/broken/hf", f"{bucket}/broken/jax"]) == 2
    assert "model.layers.1.mlp.up_proj.weight" in capsys.readouterr().err
    assert not storage.path(f"{bucket}/broken/jax").exists()


def test_eval_writes_its_output_to_a_bucket(bucket, tmp_path):
    rows = [
        {"task": "medqa", "id": str(i), "gold": "A", "choices": ["A", "B", "C", "D", "E"], "output": out}
        for i, out in enumerate(["A", "B", "the answer is A"])
    ]
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    score = ["eval", "score", "--task", "medqa", "--predictions", str(predictions), "--out"]
    assert main(score + [str(tmp_path / "local")]) == 0
    assert main(score + [f"{bucket}/eval/out"]) == 0
    assert tree(storage.fetch(f"{bucket}/eval/out")) == tree(tmp_path / "local")


@pytest.mark.parametrize("key", ["run.dir", "data.path"])
def test_other_url_schemes_are_refused_in_one_line(key, demo_data, tmp_path, capsys):
    settings = {"run.dir": str(tmp_path / "run"), "data.path": str(demo_data / "pre"), key: "s3://bucket/x"}
    code = main(["train", "--config", "tiny-pretrain", *[f"{k}={v}" for k, v in settings.items()]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: s3://bucket/x: only local paths and gs:// buckets are supported"]
    assert not (tmp_path / "run").exists()


def test_prepare_refuses_a_bucket_in_one_line(demo_data, tmp_path, capsys):
    from mellama_jax.demo import _demo_file

    code = main(
        [
            "prepare",
            "pretrain",
            "--source",
            f"biomedical={_demo_file('biomedical.jsonl')}",
            "--tokenizer",
            str(demo_data / "tok" / "tokenizer.model"),
            "--out",
            "gs://mellama-test/prepared",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        code == 2 and len(err) == 1 and err[0].startswith("error: gs://mellama-test/prepared: prepare writes a local")
    )
    assert not Path("gs:").exists() and not (Path.cwd() / "gs:").exists()


def test_a_failed_upload_is_one_line_and_leaves_nothing_in_the_bucket(
    bucket,
    tmp_path,
    tokenizer_file,  # noqa: F811
    monkeypatch,
    capsys,
):
    """The network fails after the first object of an output is written (gcsfs raising on the second, as a reset
    connection would): one line, and the objects already written are removed."""
    src = make_hf_dir(tmp_path / "hf", 2, seed=5, tokenizer=tokenizer_file)
    bucket_path = type(storage.path(f"{bucket}/x"))
    real_open, writes = bucket_path.open, []

    def failing_open(self, mode="r", *args, **kwargs):
        if "w" in mode:
            writes.append(self.name)
            if len(writes) == 2:
                raise ConnectionResetError("connection reset by peer")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(bucket_path, "open", failing_open)
    dst = f"{bucket}/upload-fails/jax"
    assert main(["convert", "hf-to-jax", str(src), dst]) == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(writes) == 2 and len(err) == 1 and "Traceback" not in stderr, stderr
    assert err[0] == (
        f"error: {dst}: the upload failed (ConnectionResetError: connection reset by peer); nothing "
        "was left there, run the command again"
    )
    monkeypatch.undo()
    assert not storage.path(dst).exists()


@pytest.mark.parametrize("where", ["bucket", "local"])
def test_an_output_beside_its_input_is_allowed_and_one_inside_it_refused(
    where,
    bucket,
    tmp_path,
    tokenizer_file,  # noqa: F811
    capsys,
):
    """`.../jax` -> `.../jax-hf` shares a prefix with its input but not a folder: allowed. `.../jax/hf` is inside it:
    refused in one line, in a bucket as on a disk."""
    root = f"{bucket}/beside" if where == "bucket" else str(tmp_path)
    src = make_hf_dir(tmp_path / "hf", 2, seed=6, tokenizer=tokenizer_file)
    assert main(["convert", "hf-to-jax", str(src), f"{root}/jax"]) == 0
    assert main(["convert", "jax-to-hf", f"{root}/jax", f"{root}/jax-hf", "--dtype", "float32"]) == 0
    capsys.readouterr()
    assert main(["convert", "jax-to-hf", f"{root}/jax", f"{root}/jax/hf", "--dtype", "float32"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "the output would overlap the input" in err[0], err


def test_a_failed_fetch_is_one_line(bucket, tmp_path, monkeypatch):
    """Reading an object fails (a reset connection): one line naming the location, not a traceback."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.yaml").write_text("seed: 1\n")
    storage.upload(tmp_path / "src", f"{bucket}/fetch-fails")
    bucket_path = type(storage.path(f"{bucket}/x"))
    real_open = bucket_path.open

    def failing_open(self, mode="r", *args, **kwargs):
        if "r" in mode:
            raise ConnectionResetError("connection reset by peer")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(bucket_path, "open", failing_open)
    with pytest.raises(ValueError, match=r"^gs://mellama-test/fetch-fails: fetching it failed \(ConnectionResetError"):
        storage.fetch(f"{bucket}/fetch-fails")  # a ValueError is what the CLI prints as one line (exit code 2)


def test_a_file_another_process_writes_later_is_seen(bucket, tmp_path):
    """gcsfs would answer exists() from the folder listing it read first, for the life of the process: a file
    another host writes afterwards (a checkpoint, uploaded metrics) would never appear."""
    import subprocess
    import sys

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("x")
    storage.upload(tmp_path / "a", f"{bucket}/later")
    assert [p.name for p in storage.path(f"{bucket}/later").iterdir()] == ["x"]
    assert not storage.path(f"{bucket}/later/y").exists()
    subprocess.run(
        [sys.executable, "-c", f"from mellama_jax import storage; storage.path('{bucket}/later/y').write_text('y')"],
        check=True,
    )
    assert storage.path(f"{bucket}/later/y").exists()
    assert storage.fetch(f"{bucket}/later").joinpath("y").read_text() == "y"
