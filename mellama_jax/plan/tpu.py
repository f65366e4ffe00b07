"""Cloud TPU chips for `plan --target tpu`: their HBM, peak bf16 FLOP/s and HBM bandwidth (the one table), and the
abstract devices of a TPU topology, described by libtpu on any host (no TPU needed), for ahead-of-time compiles.
"""

from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple

import jax
from jax.experimental import topologies

from mellama_jax.config import ConfigError


class Chip(NamedTuple):
    hbm_gib: float
    bf16_tflops: float  # peak dense bf16 per chip
    hbm_tb_per_s: float


# Per chip, from Google Cloud's TPU system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e,
# "key specifications"): v4 32 GiB, 275 TFLOP/s, 1.2 TB/s; v5e 16 GB, 197 TFLOP/s, 819 GB/s; v5p 95 GB,
# 459 TFLOP/s, 2765 GB/s; v6e 32 GB, 918 TFLOP/s, 1640 GB/s. The pages write most capacities as GB; they are
# compared as GiB here (7% generous, should they be decimal).
TPU_CHIPS = {
    "v4": Chip(32, 275, 1.2),
    "v5e": Chip(16, 197, 0.82),
    "v5p": Chip(95, 459, 2.76),
    "v6e": Chip(32, 918, 1.64),
}


def chip_of(topology: str) -> tuple[str, Chip]:
    """ "v5p:4x4x4" -> ("v5p", its Chip)."""
    name = topology.split(":")[0]
    if ":" not in topology or name not in TPU_CHIPS:
        raise ConfigError(
            f"--topology {topology!r}: expected CHIP:SHAPE with CHIP one of {sorted(TPU_CHIPS)}, "
            "e.g. v5p:4x4x4 (64 chips)"
        )
    return name, TPU_CHIPS[name]


def topology_devices(topology: str, slices: int = 1) -> list:
    """The abstract devices (one per chip) of `slices` TPU slices of shape `topology`, from libtpu."""
    name, _ = chip_of(topology)
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(
            "plan --target tpu needs libtpu, which is not installed: pip install 'mellama-jax[tpu]' (the tpu extra)"
        )
    # Compiling needs no TPU: skip the metadata-server queries and host discovery libtpu would try at start, and
    # its lock file (/tmp/libtpu_lockfile), which would fail a second plan running beside this one.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

    try:  # the host compiles on CPU: JAX need not try (and fail) to start a TPU backend here
        jax.config.update("jax_platforms", "cpu")
    except RuntimeError:  # backends already up (in-process callers, tests)
        pass

    kw = {"num_slices": slices} if slices > 1 else {}
    if name in ("v4", "v5p"):  # one device per chip: their two TensorCores act as one ("megacore")
        kw["chip_config_name"] = "megacore"
    try:
        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kw)
    except Exception as e:  # libtpu's own words for a shape it does not know
        raise ConfigError(f"--topology {topology!r}: libtpu cannot describe it: {str(e).splitlines()[0]}") from None
    return list(desc.devices)


def roofline_seconds(flops: float, bytes_accessed: float, chip: Chip) -> float:
    """A lower bound on the step time of one chip: its FLOPs at peak or its HBM traffic at full bandwidth,
    whichever takes longer (no overlap is better than perfect overlap)."""
    return max(flops / (chip.bf16_tflops * 1e12), bytes_accessed / (chip.hbm_tb_per_s * 1e12))
