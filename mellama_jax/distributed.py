"""Start JAX's multi-controller runtime from the environment the job was launched in.

Detection order (the first that applies wins, and is logged):
  1. plain variables COORDINATOR_ADDRESS, NUM_PROCESSES, PROCESS_ID (Kubernetes/JobSet, launch/local.sh)
  2. SLURM (SLURM_JOB_ID with several tasks): JAX's own SLURM detection (coordinator = first node of the
     node list, process id = SLURM_PROCID)
  3. Cloud TPU VM pods (TPU_WORKER_HOSTNAMES / TPU_WORKER_ID, or TPU_ACCELERATOR_TYPE): JAX's own detection
  4. otherwise: a single process, nothing to initialise
MELLAMA_CPU_DEVICES=N gives each process N simulated CPU devices (development and CI).
A process that dies is noticed by the others through the coordination service's heartbeat: they fail with an
error after `heartbeat_timeout_seconds` (MELLAMA_HEARTBEAT_TIMEOUT, default 100) instead of hanging.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("mellama_jax.distributed")

_initialized = False


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
