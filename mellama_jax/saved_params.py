"""A model's parameters alone, as Orbax writes them (a run's params/ and adapters/, hf-to-jax output): saved,
checked against the shapes a model expects, and restored straight into a layout (each device reads its own
shards), or onto one device."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mellama_jax import storage


def abstract_like(tree: Any, shardings: Any) -> Any:
    """Shapes and dtypes of `tree` with `shardings`: what a restore or an ahead-of-time compile is given."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def save_params(path: str | Path, params: nnx.State) -> None:
    """Parameters alone, as a nested dict of arrays: the format `init_from` and `convert` read."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(storage.path(path), nnx.to_pure_dict(params), force=True)
    checkpointer.wait_until_finished()


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def check_params(path: str | Path, abstract: nnx.State) -> None:
    """Refuse, in one line, a parameter folder that does not hold `abstract`'s parameters in their shapes: read
    from its metadata alone, so a run can check `init_from` before it writes anything."""
    where = f"train.init_from={path}"
    path = storage.path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{where}: no such parameter folder")
    try:
        found = _shapes(ocp.StandardCheckpointer().metadata(path).item_metadata)
    except Exception as e:  # orbax reports a folder that is no checkpoint with assorted exception types
        raise ValueError(f"{where}: not a parameter checkpoint ({type(e).__name__}: {e})") from None
    if not found:
        raise ValueError(
            f"{where}: not a parameter checkpoint (no arrays in its metadata; init_from takes a run's "
            "params/ or `convert hf-to-jax` output)"
        )
    expected = _shapes(nnx.to_pure_dict(abstract))
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ValueError(
            f"{where}: no parameter {missing[0]} (it holds {len(found)} arrays: another model, or "
            "not a parameter export?)"
        )
    for name, shape in expected.items():
        if found[name] != shape:
            raise ValueError(f"{where}: {name} has shape {found[name]}, this model needs {shape} (another model size?)")


def _read_budget(path, abstract: nnx.State) -> float:
    """Orbax's in-flight read budget (GB of 1e9 bytes) for about one tensor at a time: the largest array's elements
    at the wider of its stored and its target itemsize (a cast read counts in the target's), with a margin."""
    metadata = ocp.StandardCheckpointer().metadata(path).item_metadata
    itemsize = max(np.dtype(x.dtype).itemsize for x in jax.tree.leaves(metadata) + jax.tree.leaves(abstract))
    largest = max(math.prod(x.shape) for x in jax.tree.leaves(metadata))
    return 1.25 * largest * itemsize / 1e9


def load_params(path: str | Path, abstract: nnx.State, shardings: nnx.State) -> nnx.State:
    """Parameters saved by `save_params` (or `convert hf-to-jax`), restored into the given shardings, and cast to
    `abstract`'s dtypes as they are read. Each device receives only its own shards; the host reads about one
    tensor at a time (`_read_budget`; Orbax's default, 96 GB, would let a 70B load read everything at once), so
    it never holds a second copy of the model."""
    path = storage.path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no parameter checkpoint here")
    target = nnx.to_pure_dict(abstract_like(abstract, shardings))
    try:
        checkpointer = ocp.StandardCheckpointer(restore_concurrent_gb=_read_budget(path, abstract))
        restored = checkpointer.restore(path, target)
    except Exception as e:  # orbax reports structure/shape mismatches with assorted exception types
        raise ValueError(f"{path}: cannot restore parameters for this model ({type(e).__name__}: {e})") from None
    state = jax.tree.map(lambda x: x, abstract)  # a copy with the same Variables
    nnx.replace_by_pure_dict(state, restored)
    return state


def load_params_local(path: str | Path, abstract: nnx.State) -> nnx.State:
    """Parameters onto this host's first device, whatever mesh wrote them (for export and inspection)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return load_params(path, abstract, jax.tree.map(lambda _: device, abstract))
