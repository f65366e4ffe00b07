"""Device mesh and the logical-axis rule table -> NamedShardings.

The model annotates parameters and activations with logical names ("embed", "heads", "mlp", ...). This module
alone turns them into mesh placements, using the rule table from the config (MeshConfig.rules), so that a new
layout is a config change. The mapping itself is Flax's `logical_to_mesh_axes` (MaxText's semantics: rules are
tried in order and a mesh axis is used at most once per array).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mellama_jax.config import ConfigError, MeshConfig


def _resolve(shape: dict[str, int], total: int, kind: str) -> dict[str, int]:
    known = math.prod(v for v in shape.values() if v != -1)
    if -1 in shape.values():
        if total % known:
            raise ConfigError(f"mesh.{kind} {shape}: {total} devices do not divide by {known}")
        return {k: (total // known if v == -1 else v) for k, v in shape.items()}
    if known != total:
        raise ConfigError(f"mesh.{kind} {shape} has {known} devices, but {total} are available")
    return dict(shape)


def parse_layout(text: str) -> dict[str, int]:
    """ "fsdp=4,tensor=2" -> {"fsdp": 4, "tensor": 2} (the command-line form of a mesh layout)."""
    try:
        return {k.strip(): int(v) for k, v in (kv.split("=") for kv in text.split(",") if kv.strip())}
    except ValueError:
        raise ConfigError(
            f"mesh layout {text!r}: expected axis=size pairs joined by commas, e.g. fsdp=4,tensor=2"
        ) from None


def layout_overrides(text: str, slices: int = 1) -> list[str]:
    """Config overrides that put one process's (or one TPU slice's) devices into the layout "fsdp=4,tensor=2"
    (unnamed axes: 1); `slices` > 1 adds data parallelism across TPU slices (dcn)."""
    ici = parse_layout(text)
    axes = ("data", "fsdp", "tensor")
    return [
        "mesh.ici={" + ", ".join(f"{a}: {ici.get(a, 1)}" for a in axes) + "}",
        "mesh.dcn={" + ", ".join(f"{a}: {slices if a == 'data' else 1}" for a in axes) + "}",
    ]


def mesh_shape(cfg: MeshConfig, num_devices: int, num_processes: int = 1) -> tuple[dict[str, int], dict[str, int]]:
    """(ici, dcn) with -1 resolved. dcn spans processes (or TPU slices, see `_granules`); ici spans the devices of
    one of them."""
    dcn_total = math.prod(v for v in cfg.dcn.values() if v != -1)
    if -1 in cfg.dcn.values() or dcn_total > 1:
        dcn = _resolve(cfg.dcn, num_processes, "dcn")
    else:
        dcn = dict(cfg.dcn)
    ici = _resolve(cfg.ici, num_devices // math.prod(dcn.values()), "ici")
    return ici, dcn


def _granules(devices: list) -> tuple[int, bool]:
    """What dcn spans: (count, by process). The slices of a multi-slice TPU job (ICI joins the hosts within a
    slice, only the data-center network joins slices), else the processes (hosts: NVLink inside, InfiniBand
    across)."""
    slices = {getattr(d, "slice_index", None) for d in devices}
    if len(slices) > 1:
        return len(slices), False
    return len({d.process_index for d in devices}), True


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    granules, by_process = _granules(devices)
    dcn_total = math.prod(v for v in cfg.dcn.values() if v != -1)
    if granules == 1 and dcn_total > 1:
        # One process standing in for many hosts (planning on simulated devices): fold dcn into ici.
        dcn = _resolve(cfg.dcn, dcn_total, "dcn")
        ici = _resolve(cfg.ici, len(devices) // dcn_total, "ici")
        shape = tuple(ici[a] * dcn[a] for a in ici)
        array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(array, tuple(ici), axis_types=(AxisType.Auto,) * len(ici))
    ici, dcn = mesh_shape(cfg, len(devices), granules)
    names = tuple(ici)
    if math.prod(dcn.values()) > 1:
        array = mesh_utils.create_hybrid_device_mesh(
            tuple(ici.values()), tuple(dcn.values()), devices, process_is_granule=by_process
        )
    else:
        array = mesh_utils.create_device_mesh(tuple(ici.values()), devices, allow_split_physical_axes=True)
    return Mesh(array, names, axis_types=(AxisType.Auto,) * len(names))


def logical_to_spec(logical: tuple, rules) -> PartitionSpec:
    return nn.logical_to_mesh_axes(tuple(logical), tuple((k, v) for k, v in rules))


def shard_shape(name: str, shape: tuple[int, ...], spec: PartitionSpec, mesh_shape, logical) -> tuple[int, ...]:
    """One device's shard of an array of `shape` laid out by `spec` on a mesh of `mesh_shape` (axis -> size; the
    mesh need not exist), or a one-line error naming the dimension that does not divide."""
    shard = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        ways = math.prod(mesh_shape.get(a, 1) for a in axes)
        if dim % ways:
            raise ConfigError(
                f"{name}: dimension {dim} (logical {logical}) does not divide over mesh axes {axes} "
                f"of size {ways}; choose a mesh (or rules) whose axes divide it"
            )
        shard.append(dim // ways)
    return tuple(shard)


def named_sharding(
    mesh: Mesh, logical: tuple, rules, shape: tuple[int, ...] | None = None, name: str = "array"
) -> NamedSharding:
    spec = logical_to_spec(logical, rules)
    if shape is not None:
        shard_shape(name, shape, spec, dict(mesh.shape), logical)
    return NamedSharding(mesh, spec)


def state_shardings(state: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a pytree of nnx Variables (model state, optimizer state) from their logical axes."""

    def one(path, var):
        if not isinstance(var, nnx.Variable):  # e.g. optimizer step counts: replicated
            return NamedSharding(mesh, PartitionSpec())
        logical = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        name = "/".join(str(p.key if hasattr(p, "key") else p) for p in path)
        return var.replace(named_sharding(mesh, logical, rules, tuple(var.shape), name))

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def bytes_per_device(state: Any, shardings: Any) -> int:
    """The largest per-device footprint of `state` laid out by `shardings` (no allocation)."""
    leaves = jax.tree.leaves(state)
    shards = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    total = 0
    for x, s in zip(leaves, shards, strict=True):
        total += math.prod(s.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
    return total
