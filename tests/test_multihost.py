"""Several JAX processes on this machine (launch/local.sh): same losses as one process, checkpoints that move
between process counts, a dead process that stops the others, and the cluster launch scripts."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import logged_losses

from mellama_jax.config import CONFIG_ROOT, load_config
from mellama_jax.distributed import detect
from mellama_jax.train.loop import train

REPO = Path(__file__).resolve().parents[1]
SHELLCHECK = Path(sys.executable).parent / "shellcheck"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


losses = logged_losses


def local(config, overrides, processes=2, devices=4, timeout=600):
    cmd = [
        "bash",
        str(REPO / "launch" / "local.sh"),
        "-n",
        str(processes),
        "-d",
        str(devices),
        "-p",
        str(free_port()),
        str(config),
    ] + list(overrides)
    result = subprocess.run(
        cmd, cwd=REPO, env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def data(demo_data):
    return demo_data


def common(run_dir, *extra):
    return [
        f"run.dir={run_dir}",
        "run.progress=false",
        "run.plot=false",
        "run.log_every=1",
        "train.steps=10",
        "checkpoint.every=5",
        "checkpoint.keep_last=5",
        "mesh.ici={data: 2, fsdp: -1, tensor: 1}",
    ] + list(extra)


@pytest.fixture(scope="module")
def pretrain_runs(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("pre-runs")
    overrides = [f"data.path={data}/pre", "train.batch_size=16", "train.grad_accum=2"]
    config = CONFIG_ROOT / "tiny-pretrain.yaml"
    train(load_config(config, common(root / "one", *overrides)))  # 1 process x 8 devices (this one)
    local(config, common(root / "two", *overrides))  # 2 processes x 4 devices
    return root, config, overrides


def test_two_processes_match_one_pretrain(pretrain_runs):
    root, _, _ = pretrain_runs
    one, two = losses(root / "one"), losses(root / "two")
    assert sorted(one) == sorted(two) == list(range(1, 11))
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-5, step


@pytest.mark.slow  # 36 s; the multi-process mechanics are the pretraining test's, LoRA's state is the same tree
def test_two_processes_match_one_lora(pretrain_runs, data, tmp_path):
    root, _, _ = pretrain_runs
    config = CONFIG_ROOT / "tiny-lora.yaml"
    overrides = [f"data.path={data}/ins", f"train.init_from={root}/one/params", "lora.base_dtype=float32"]
    train(load_config(config, common(tmp_path / "one", *overrides)))
    local(config, common(tmp_path / "two", *overrides))
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 11))
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-5, step


# one -> two is slow-marked (the suite's 15-minute budget; make test-all runs it): two -> one covers resharding
@pytest.mark.parametrize("saved_by, resumed_by", [("two", "one"), pytest.param("one", "two", marks=pytest.mark.slow)])
def test_checkpoints_move_between_process_counts(pretrain_runs, tmp_path, saved_by, resumed_by):
    root, config, overrides = pretrain_runs
    run = tmp_path / "run"
    shutil.copytree(root / saved_by, run)
    shutil.rmtree(run / "checkpoints" / "10")
    (run / "metrics.jsonl").write_text("")
    if resumed_by == "one":
        train(load_config(config, common(run, *overrides)))
    else:
        local(config, common(run, *overrides))
    resumed, reference = losses(run), losses(root / saved_by)
    assert sorted(resumed) == [6, 7, 8, 9, 10]
    for step, loss in resumed.items():
        assert abs(loss - reference[step]) <= 1e-5, step


def test_a_dead_process_stops_the_others(data, tmp_path):
    port = free_port()
    procs = []
    for i in range(2):
        env = dict(
            os.environ,
            COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            NUM_PROCESSES="2",
            PROCESS_ID=str(i),
            MELLAMA_CPU_DEVICES="4",
            MELLAMA_HEARTBEAT_TIMEOUT="10",
            JAX_PLATFORMS="cpu",
        )
        cmd = [sys.executable, "-m", "mellama_jax.cli", "train", "--config", str(CONFIG_ROOT / "tiny-pretrain.yaml")]
        cmd += common(
            tmp_path, f"data.path={data}/pre", "train.steps=100000", "checkpoint.every=100000", "train.batch_size=16"
        )
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    deadline = time.time() + 300
    while not ((tmp_path / "metrics.jsonl").exists() and len((tmp_path / "metrics.jsonl").read_text()) > 0):
        assert time.time() < deadline and procs[0].poll() is None
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.time()
    _, err = procs[0].communicate(timeout=120)  # bounded: our heartbeat's timeout, not forever
    assert time.time() - killed < 20  # ours (10 s) fires before JAX's own (20 s), whose abort dumps a stack
    assert procs[0].returncode == 4, err[-3000:]
    lines = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith("error: another process of this job stopped answering"), err
    assert "resumes from the start (no checkpoint was saved yet)" in lines[0]
    assert not any(
        dump in err for dump in ("Traceback", "internal error", "Fatal Python error", "SIGABRT", "*** Check failure")
    ), err[-3000:]


def test_a_process_that_fails_stops_the_others_naming_its_error(data, tmp_path):
    """One host lacks the data (exit 2, its one-line error): the other stops at once with that error in its own line,
    not after a heartbeat timeout, and not by JAX's abort. Both hosts run the same command, as a launcher does; the
    relative data.path resolves on host 0 only (each process has its own working folder, as hosts have disks)."""
    port = free_port()
    procs = []
    for i in range(2):
        host = tmp_path / f"host{i}"
        host.mkdir()
        if i == 0:
            (host / "not-copied-here").symlink_to(data / "pre")
        env = dict(
            os.environ,
            COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            NUM_PROCESSES="2",
            PROCESS_ID=str(i),
            MELLAMA_CPU_DEVICES="4",
            MELLAMA_HEARTBEAT_TIMEOUT="60",
            JAX_PLATFORMS="cpu",
        )
        cmd = [sys.executable, "-m", "mellama_jax.cli", "train", "--config", str(CONFIG_ROOT / "tiny-pretrain.yaml")]
        cmd += common(tmp_path / "run", "data.path=not-copied-here", "train.steps=100000", "train.batch_size=16")
        procs.append(
            subprocess.Popen(cmd, cwd=host, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    started = time.time()
    _, err = procs[0].communicate(timeout=180)
    _, err1 = procs[1].communicate(timeout=60)
    assert procs[1].returncode == 2 and "not-copied-here/manifest.json: not a prepared dataset" in err1, err1[-2000:]
    assert procs[0].returncode == 4 and time.time() - started < 60, err[-3000:]
    lines = [l for l in err.splitlines() if l.startswith("error: ")]
    assert (
        len(lines) == 1
        and lines[0].startswith("error: process 1 of this job failed (")
        and "not-copied-here" in lines[0]
        and lines[0].endswith("); this process stops too")
    ), err[-3000:]


PEER = """
import os, signal, sys, time
from mellama_jax import distributed
distributed.initialize()
if os.environ["PROCESS_ID"] == "1":
    {one}
else:
    time.sleep({wait})
    distributed.leave(0)
    print("finished", flush=True)
"""


@pytest.mark.parametrize(
    "one, wait, timeout, code, line",
    [
        ("os.kill(os.getpid(), signal.SIGKILL)", 30, 3, 4, "stopped answering (process 1 sent no heartbeat for 3 s)"),
        (
            "distributed.leave(2, 'data.path=x: no such folder')",
            30,
            3,
            4,
            "error: process 1 of this job failed (data.path=x: no such folder); this process stops too",
        ),
        ("distributed.leave(0)", 8, 3, 0, None),  # past both timeouts: a finished peer is not a dead one
        # alive for longer than the timeout, then its beats pause for ~2 s (a C call holding the GIL: a backtracking
        # regex), well inside the timeout: a slow peer is not a dead one
        (
            "time.sleep(8); import re; re.match(r'(a+)+$', 'a' * 26 + 'b'); time.sleep(3); distributed.leave(0)",
            16,
            6,
            0,
            None,
        ),
    ],
    ids=["killed", "failed", "finished", "paused"],
)
def test_the_watchdog_tells_dead_failed_finished_and_paused_peers_apart(one, wait, timeout, code, line):
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PEER.format(one=one, wait=wait)],
            cwd=REPO,
            text=True,
            env=dict(
                os.environ,
                COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                NUM_PROCESSES="2",
                PROCESS_ID=str(i),
                MELLAMA_HEARTBEAT_TIMEOUT=str(timeout),
                JAX_PLATFORMS="cpu",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    out, err = procs[0].communicate(timeout=120)
    procs[1].communicate(timeout=60)
    assert procs[0].returncode == code, err[-3000:]
    if line is None:
        assert "finished" in out and "error:" not in err, err[-3000:]
    else:
        errors = [l for l in err.splitlines() if l.startswith("error: ")]
        assert len(errors) == 1 and line in errors[0], err[-3000:]
        assert "Traceback" not in err and "Check failure" not in err, err[-3000:]


def test_detection_from_the_environment():
    assert detect({}) == "single"
    assert detect({"COORDINATOR_ADDRESS": "127.0.0.1:1", "NUM_PROCESSES": "2", "PROCESS_ID": "0"}) == "env"
    assert detect({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "20"}) == "slurm"
    assert detect({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) == "single"
    assert detect({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"


def test_launch_scripts_pass_shellcheck_and_dry_run():
    scripts = sorted((REPO / "launch").iterdir())
    assert [s.name for s in scripts] == [
        "bench_gpu.sh",
        "local.sh",
        "prepare_array.sbatch",
        "slurm_gpu.sbatch",
        "tpu_pod.sh",
    ]
    result = subprocess.run([str(SHELLCHECK)] + [str(s) for s in scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    env = dict(os.environ, DRY_RUN="1", NODES="20", WORKERS="4", TPU_NAME="pod", ZONE="z")
    out = subprocess.run(
        ["bash", str(REPO / "launch" / "slurm_gpu.sbatch"), "configs/x.yaml", "train.steps=5"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out[0].startswith("srun --ntasks-per-node=1") and len(out) == 21
    assert (
        out[20] == "node 19: SLURM_PROCID=19 SLURM_NTASKS=20 python3 -m mellama_jax.cli train --config "
        "configs/x.yaml train.steps=5"
    )
    out = subprocess.run(
        ["bash", str(REPO / "launch" / "tpu_pod.sh"), "configs/x.yaml"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert "--worker=all" in out[0] and len(out) == 5
    out = subprocess.run(
        ["bash", str(REPO / "launch" / "local.sh"), "--dry-run", "-n", "3", "-p", "999", "configs/x.yaml", "a=1"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out[2] == (
        "env COORDINATOR_ADDRESS=127.0.0.1:999 NUM_PROCESSES=3 PROCESS_ID=2 MELLAMA_CPU_DEVICES=4 "
        "JAX_PLATFORMS=cpu python3 -m mellama_jax.cli train --config configs/x.yaml a=1"
    )


FAKE_SRUN = """#!/usr/bin/env bash
# stands in for srun: a task that saves on SIGTERM (exit code $SRUN_EXIT), or ends by itself after $SRUN_SECONDS
trap 'echo "TERM $*" >> "$FAKE_LOG"; exit "${SRUN_EXIT:-0}"' TERM
echo started >> "$FAKE_LOG"
for ((i = 0; i < ${SRUN_SECONDS:-600} * 10; i++)); do sleep 0.1; done
echo "finished" >> "$FAKE_LOG"
"""


@pytest.mark.parametrize(
    "signal_name, srun_exit, requeued",
    [
        ("SIGUSR1", "0", True),  # the time limit's warning: save, then requeue
        ("SIGTERM", "0", True),  # preemption
        ("SIGUSR1", "3", False),  # the save failed: no requeue, its exit code
        (None, "0", False),  # the run finished by itself
    ],
)
def test_slurm_script_saves_and_requeues_on_its_warning_signal(tmp_path, signal_name, srun_exit, requeued):
    """launch/slurm_gpu.sbatch with stand-ins for srun and scontrol on PATH: SLURM's warning (USR1, asked for
    with --signal=B:USR1@600) or preemption (TERM) reaches the tasks as SIGTERM, and once they have saved the
    job is requeued with `scontrol requeue $SLURM_JOB_ID`; a run that ends by itself is not."""
    import signal
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\necho "$*" >> "$SCONTROL_LOG"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    log, scontrol = tmp_path / "srun.log", tmp_path / "scontrol.log"
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        FAKE_LOG=str(log),
        SCONTROL_LOG=str(scontrol),
        SLURM_JOB_ID="1234",
        PYTHON="python3",
        SRUN_EXIT=srun_exit,
        SRUN_SECONDS="600" if signal_name else "0",
    )
    assert "#SBATCH --signal=B:USR1@600" in (REPO / "launch" / "slurm_gpu.sbatch").read_text()
    proc = subprocess.Popen(
        ["bash", str(REPO / "launch" / "slurm_gpu.sbatch"), "configs/x.yaml"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 30
    while not (log.exists() and "started" in log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    if signal_name:
        proc.send_signal(getattr(signal, signal_name))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (0 if srun_exit == "0" else 3), err
    lines = log.read_text().splitlines()
    assert lines[-1] == (
        "finished"
        if signal_name is None
        else "TERM --ntasks-per-node=1 --kill-on-bad-exit=1 python3 -m mellama_jax.cli train --config configs/x.yaml"
    )
    assert (scontrol.read_text().splitlines() if scontrol.exists() else []) == (["requeue 1234"] if requeued else [])


@pytest.mark.slow  # 21 s; what a lent GPU runs: `make test-all` checks it
def test_gpu_benchmark_script_runs_its_steps_on_a_cpu(tmp_path):
    """launch/bench_gpu.sh (what a lent GPU runs) in its SMOKE mode: tiny shapes, the headline row with its trace."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as on the GPU machine
    env.update(SMOKE="1", PYTHON=sys.executable)
    out = subprocess.run(
        ["bash", str(REPO / "launch" / "bench_gpu.sh"), str(tmp_path), "mesh"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "===== versions: rc=0" in out and "===== mesh: rc=0" in out
    log = (tmp_path / "log.txt").read_text()
    assert '"tokens_per_s"' in log and "error" not in log
    assert {p.name for p in (tmp_path / "prof" / "data1").iterdir()} == {"trace.json.gz", "hlo.txt.gz"}


def test_a_run_in_a_bucket_resumes_after_a_process_is_killed(pretrain_runs, data, bucket, tmp_path):
    """No shared disk (a TPU pod): run directory, data and init_from on the bucket. One process is SIGKILLed after
    a checkpoint; the other stops in one line naming that checkpoint; the same command resumes and ends with the
    parameters of an uninterrupted run."""
    import numpy as np
    from flax import nnx

    from mellama_jax import storage
    from mellama_jax.model import init_abstract
    from mellama_jax.saved_params import load_params_local

    root, config, _ = pretrain_runs
    where = f"{bucket}/killed"
    storage.upload(data / "pre", f"{where}/data")
    storage.upload(root / "one" / "params", f"{where}/init")

    def settings(run, data_path, init):
        return common(
            run,
            f"data.path={data_path}",
            f"train.init_from={init}",
            "train.batch_size=16",
            "train.steps=60",
            "checkpoint.every=10",
            "checkpoint.async_save=false",
            "run.log_every=10",
        )

    local(config, settings(tmp_path / "reference", data / "pre", root / "one" / "params"))
    in_bucket = settings(f"{where}/run", f"{where}/data", f"{where}/init")
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "mellama_jax.cli", "train", "--config", str(config), *in_bucket],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(
                os.environ,
                COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                NUM_PROCESSES="2",
                PROCESS_ID=str(i),
                MELLAMA_CPU_DEVICES="4",
                MELLAMA_HEARTBEAT_TIMEOUT="5",
                JAX_PLATFORMS="cpu",
            ),
        )
        for i in range(2)
    ]
    uploaded = storage.path(f"{where}/run/metrics.jsonl")  # uploaded right after each checkpoint
    deadline = time.time() + 300
    while not uploaded.exists():
        assert time.time() < deadline and procs[0].poll() is None, procs[0].communicate()[1][-3000:]
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGKILL)
    _, err = procs[0].communicate(timeout=120)
    procs[1].communicate()
    assert procs[0].returncode == 4, err[-3000:]
    stopped = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(stopped) == 1 and "resumes from checkpoint " in stopped[0], err[-3000:]
    shutil.rmtree(storage.cache_root())  # the re-launch may land on other hosts: nothing of this one's disk is left
    resumed = local(config, in_bucket)
    assert "resuming at step " in resumed.stdout, resumed.stdout[-2000:]

    abstract = nnx.split(init_abstract(load_config(config).model))[1]
    expected = nnx.to_flat_state(load_params_local(tmp_path / "reference" / "params", abstract))
    got = dict(nnx.to_flat_state(load_params_local(f"{where}/run/params", abstract)))
    for name, value in expected:
        np.testing.assert_array_equal(
            np.asarray(got[name].get_value()), np.asarray(value.get_value()), err_msg=str(name)
        )
    assert sorted(logged_losses_in(f"{where}/run")) == list(range(10, 61, 10))
    # the run's export, read from the bucket with the run files above it that name the model and tokenizer
    from test_convert import all_tensors

    from mellama_jax.cli import main

    assert main(["convert", "jax-to-hf", f"{where}/run/params", f"{where}/hf", "--dtype", "float32"]) == 0
    assert (
        main(
            ["convert", "jax-to-hf", str(tmp_path / "reference" / "params"), str(tmp_path / "hf"), "--dtype", "float32"]
        )
        == 0
    )
    exported, reference = all_tensors(storage.fetch(f"{where}/hf")), all_tensors(tmp_path / "hf")
    assert sorted(exported) == sorted(reference) and all((exported[k] == reference[k]).all() for k in reference)


def logged_losses_in(run_dir: str) -> dict[int, float]:
    from mellama_jax import storage

    local_copy = storage.fetch(f"{run_dir}/metrics.jsonl").parent
    return losses(local_copy)
