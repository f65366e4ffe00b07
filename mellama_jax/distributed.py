"""Start JAX's multi-controller runtime from the environment the job was launched in.

Detection order (the first that applies wins, and is logged):
  1. plain variables COORDINATOR_ADDRESS, NUM_PROCESSES, PROCESS_ID (Kubernetes/JobSet, launch/local.sh)
  2. SLURM (SLURM_JOB_ID with several tasks): JAX's own SLURM detection (coordinator = first node of the
     node list, process id = SLURM_PROCID)
  3. Cloud TPU VM pods (TPU_WORKER_HOSTNAMES / TPU_WORKER_ID, or TPU_ACCELERATOR_TYPE): JAX's own detection
  4. otherwise: a single process, nothing to initialise
MELLAMA_CPU_DEVICES=N gives each process N simulated CPU devices (development and CI).
A process that dies is noticed by the others: when a collective fails first (Gloo, NCCL), a survivor says so in
one line, naming where a re-launch resumes (`resume_point`, set by the run), and exits with code 4 (`peer_lost`);
otherwise JAX's coordination service aborts it after `heartbeat_timeout_seconds` (MELLAMA_HEARTBEAT_TIMEOUT,
default 100). (jaxlib's client takes a missed-heartbeat callback, but a Python one fails to receive its status.)
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("mellama_jax.distributed")

_initialized = False
EXIT_PEER_LOST = 4
# What a re-launch resumes from, as the run knows it now (train/loop.py sets it once it has a checkpoint manager).
resume_point = lambda: "its last checkpoint"  # noqa: E731


def peer_lost(detail: str = "") -> None:
    """End this process at once: one line and exit code 4. With a peer gone, closing the checkpoint manager or
    JAX's distributed client would wait on the dead process (and JAX's client would abort this one)."""
    import sys

    detail = detail.strip().splitlines()[0][:200] if detail.strip() else "its heartbeats stopped"
    sys.stdout.flush()
    print(f"error: another process of this job stopped answering ({detail}); this process stops too. Re-launch "
          f"the same command on every host: it resumes from {resume_point()}", file=sys.stderr, flush=True)
    os._exit(EXIT_PEER_LOST)


def detect(env: dict | None = None) -> str:
    env = os.environ if env is None else env
    if env.get("COORDINATOR_ADDRESS") and env.get("NUM_PROCESSES"):
        return "env"
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))) > 1:
        return "slurm"
    if env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_ACCELERATOR_TYPE"):
        return "tpu"
    return "single"


def initialize(env: dict | None = None) -> str:
    """Initialise once per process; returns the method used ('env', 'slurm', 'tpu' or 'single')."""
    global _initialized
    env = os.environ if env is None else env
    import jax

    if env.get("MELLAMA_CPU_DEVICES"):
        jax.config.update("jax_num_cpu_devices", int(env["MELLAMA_CPU_DEVICES"]))
    method = detect(env)
    if _initialized or method == "single":
        _initialized = True
        return method
    heartbeat = int(env.get("MELLAMA_HEARTBEAT_TIMEOUT", "100"))
    if method == "env":
        jax.distributed.initialize(coordinator_address=env["COORDINATOR_ADDRESS"],
                                   num_processes=int(env["NUM_PROCESSES"]), process_id=int(env["PROCESS_ID"]),
                                   heartbeat_timeout_seconds=heartbeat)
    else:  # JAX detects SLURM and Cloud TPU pods itself
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat)
    _initialized = True
    log.warning("jax.distributed (%s): process %d of %d, %d local / %d global devices", method,
                jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return method
