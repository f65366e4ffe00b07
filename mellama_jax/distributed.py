"""Start JAX's multi-controller runtime from the environment the job was launched in.

Detection order (the first that applies wins, and is logged):
  1. plain variables COORDINATOR_ADDRESS, NUM_PROCESSES, PROCESS_ID (Kubernetes/JobSet, launch/local.sh)
  2. SLURM (SLURM_JOB_ID with several tasks): JAX's own SLURM detection (coordinator = first node of the
     node list, process id = SLURM_PROCID)
  3. Cloud TPU VM pods (TPU_WORKER_HOSTNAMES / TPU_WORKER_ID, or TPU_ACCELERATOR_TYPE): JAX's own detection
  4. otherwise: a single process, nothing to initialise
MELLAMA_CPU_DEVICES=N gives each process N simulated CPU devices (development and CI).
A process that dies is noticed by the others, which say so in one line naming where a re-launch resumes
(`resume_point`, set by the run) and exit with code 4 (`peer_lost`). Two ways notice it: a collective that fails
(Gloo, NCCL), or our `Watchdog`, whose heartbeats go through the coordination service's key-value store and time
out after MELLAMA_HEARTBEAT_TIMEOUT seconds (default 100). JAX's own heartbeat is given three times that
(`JAX_HEARTBEAT_FACTOR`): it aborts the process from C++ with a stack dump (jaxlib's client takes a missed-heartbeat
callback, but a Python one fails to receive its status), so ours must fire first, and process 0 must also have
lingered for its peers (`_exit`) before JAX's fires; with twice, a loaded host let JAX's win. A process that ends,
cleanly or with an error, says so in the store (`leave`), so its peers do not take a finished process for a dead
one.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time

log = logging.getLogger("mellama_jax.distributed")

_initialized = False
EXIT_PEER_LOST = 4
# What a re-launch resumes from, as the run knows it now (train/loop.py sets it once it has a checkpoint manager).
resume_point = lambda: "its last checkpoint"  # noqa: E731


JAX_HEARTBEAT_FACTOR = 3  # JAX's heartbeat timeout over ours (see the module)
_ending = threading.Lock()  # held by the thread that ends the process (the watchdog's, or the main one)


def peer_lost(detail: str = "") -> None:
    """End this process at once: one line and exit code 4. With a peer gone, closing the checkpoint manager or
    JAX's distributed client would wait on the dead process (and JAX's client would abort this one)."""
    detail = detail.strip().splitlines()[0][:200] if detail.strip() else "its heartbeats stopped"
    _end(
        f"error: another process of this job stopped answering ({detail}); this process stops too. Re-launch the "
        f"same command on every host: it resumes from {resume_point()}"
    )


def peer_failed(peer: int, why: str) -> None:
    """End this process because process `peer` ended with an error (its own line says which): one line, exit 4."""
    _end(f"error: process {peer} of this job failed ({why}); this process stops too")


def _end(line: str) -> None:
    if not _ending.acquire(blocking=False):  # the other thread is ending it already, with its own line
        threading.Event().wait()
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    _exit(EXIT_PEER_LOST)


def _exit(code: int) -> None:
    """Exit now, without JAX's shutdown (a barrier that a lost or failed peer never reaches, and whose failure JAX
    answers with an abort and a stack dump). Process 0 holds the key-value store the others read: it lingers for
    two of their polls, so that they read why and end in their own line, not lose the store under them."""
    sys.stdout.flush()
    sys.stderr.flush()
    if _watchdog is not None and _watchdog.me == 0:
        time.sleep(2 * _watchdog.interval + 0.5)
    os._exit(code)


BEAT = "mellama/beat/"  # + process index: a counter while alive, then "done" or "failed: <why>"


class Watchdog(threading.Thread):
    """Beats every `interval` seconds and watches the other processes' beats; a peer whose beat has not moved for
    `timeout` seconds, that left with an error, or a coordinator that no longer answers, ends this process
    (`peer_lost`). A daemon thread: it runs while the main thread waits in a collective that will never return
    (NCCL does not notice a dead peer)."""

    def __init__(self, client, me: int, count: int, timeout: float, interval: float = 1.0):
        super().__init__(name="mellama-watchdog", daemon=True)
        self.client, self.me, self.count, self.timeout, self.interval = client, me, count, timeout, interval
        self.stopped = threading.Event()
        self.status_lock = threading.Lock()  # a beat never lands after the final status

    def run(self) -> None:
        now = time.monotonic()
        seen = {p: (None, now) for p in range(self.count) if p != self.me}  # peer -> (last beat, when it changed)
        beat = 0
        while not self.stopped.wait(self.interval):
            beat += 1
            try:
                with self.status_lock:
                    if self.stopped.is_set():
                        return
                    self.client.key_value_set(f"{BEAT}{self.me}", str(beat), allow_overwrite=True)
                beats = dict(self.client.key_value_dir_get(BEAT))
            except Exception as e:  # the store lives in process 0's coordination service
                if not self.stopped.is_set():
                    peer_lost(f"the coordinator, process 0, does not answer: {str(e).splitlines()[0][:120]}")
                return
            now = time.monotonic()
            for peer, (last, since) in list(seen.items()):
                value = beats.get(f"{BEAT}{peer}")
                if value == "done":
                    del seen[peer]
                elif value is not None and value.startswith("failed: "):
                    # an error every process meets (a bad config) is this one's to report in its own line: give
                    # the main thread two polls to reach it first
                    self.stopped.wait(2 * self.interval)
                    peer_failed(peer, value[len("failed: ") :])
                elif value != last:
                    seen[peer] = (value, now)
                elif now - since > self.timeout:
                    peer_lost(f"process {peer} sent no heartbeat for {self.timeout:.0f} s")

    def leave(self, status: str) -> None:
        """Stop beating and tell the peers how this process ended ('done', or 'failed: ...')."""
        with self.status_lock:
            if self.stopped.is_set():
                return
            self.stopped.set()
            try:
                self.client.key_value_set(f"{BEAT}{self.me}", status, allow_overwrite=True)
            except Exception:  # the coordinator is gone: nobody is left to tell
                pass


_watchdog: Watchdog | None = None


def leave(code: int, why: str = "") -> None:
    """Called once the command has ended with exit `code`: peers stop watching this process. A failed one ends
    here, once its peers can read why (they end too, naming it)."""
    if _watchdog is None:
        return
    if code == 0:
        _watchdog.leave("done")
        return
    if not _ending.acquire(blocking=False):  # a lost peer is ending this process already
        threading.Event().wait()
    _watchdog.leave(f"failed: {why.strip()[:200] or f'exit code {code}'}")
    _exit(code)


def _start_watchdog(timeout: float) -> None:
    global _watchdog
    import jax  # here, as in initialize
    from jax._src import distributed as jax_distributed  # the client JAX made; no public handle to it

    _watchdog = Watchdog(jax_distributed.global_state.client, jax.process_index(), jax.process_count(), timeout)
    _watchdog.start()
    atexit.register(_watchdog.leave, "failed: exited before its command ended")  # no-op after a leave()


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
    import jax  # here: cli.py imports this module, and `--help` should not wait for JAX

    if env.get("MELLAMA_CPU_DEVICES"):
        jax.config.update("jax_num_cpu_devices", int(env["MELLAMA_CPU_DEVICES"]))
    method = detect(env)
    if _initialized or method == "single":
        _initialized = True
        return method
    heartbeat = int(env.get("MELLAMA_HEARTBEAT_TIMEOUT", "100"))
    jax_heartbeat = JAX_HEARTBEAT_FACTOR * heartbeat
    if method == "env":
        jax.distributed.initialize(
            coordinator_address=env["COORDINATOR_ADDRESS"],
            num_processes=int(env["NUM_PROCESSES"]),
            process_id=int(env["PROCESS_ID"]),
            heartbeat_timeout_seconds=jax_heartbeat,
        )
    else:  # JAX detects SLURM and Cloud TPU pods itself
        jax.distributed.initialize(heartbeat_timeout_seconds=jax_heartbeat)
    _initialized = True
    _start_watchdog(heartbeat)
    log.warning(
        "jax.distributed (%s): process %d of %d, %d local / %d global devices",
        method,
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return method
