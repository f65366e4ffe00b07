"""Orbax checkpoints: the train state and the data iterator saved together.

A run directory holds
  checkpoints/<step>/state     TrainState (step, trainable parameters, optimizer state), sharded arrays
  checkpoints/<step>/meta      JSON: step, seed, mode, config, and the Grain iterator state. Every process's
                               iterator is at the same index (its slice of global batch k is its k-th
                               batch), so one state restores any number of processes (P -> P').
  params/ or adapters/         the final trainable parameters alone (`saved_params`: what `init_from` and the
                               converters read)
Orbax writes each checkpoint to a temporary directory and renames it when complete, so a crash mid-save leaves
the previous checkpoints usable. Restores go straight into the current mesh's shardings (any layout).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from mellama_jax import storage
from mellama_jax.config import CheckpointConfig


def manager(directory: str | Path, cfg: CheckpointConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep_last,
        keep_period=cfg.keep_every or None,
        save_interval_steps=1,
        enable_async_checkpointing=cfg.async_save,
        create=True,
    )
    return ocp.CheckpointManager(storage.path(directory), options=options, item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state, iterator, meta: dict) -> None:
    meta = dict(meta, data_state=iterator.get_state())
    mngr.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
    )


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, iterator) -> tuple[Any, dict]:
    restored = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    )
    iterator.set_state(restored.meta["data_state"])
    return restored.state, restored.meta
