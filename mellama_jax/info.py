"""What a model costs on the devices at hand, from abstract shapes only (a 70B model needs no memory here)."""

from __future__ import annotations

import jax
from flax import nnx

from mellama_jax import sharding
from mellama_jax.config import load_config
from mellama_jax.model import count_params, init_abstract

GiB = 1024**3


def describe(config_path: str | None = None, overrides: list[str] = (), model: str | None = None) -> str:
    overrides = list(overrides) + ([f"model.preset={model}"] if model else [])
    cfg = load_config(config_path, overrides)
    devices = jax.devices()
    mesh = sharding.make_mesh(cfg.mesh, devices)
    abstract = nnx.state(init_abstract(cfg.model), nnx.Param)
    shardings = sharding.state_shardings(abstract, mesh, cfg.mesh.rules)
    params_bytes = sharding.bytes_per_device(abstract, shardings)
    # Training holds fp32 gradients and two fp32 Adam moments laid out like the parameters.
    fp32 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, "float32"), abstract)
    fp32_bytes = sharding.bytes_per_device(fp32, shardings)
    lines = [
        f"backend: {jax.default_backend()}  devices: {len(devices)} x {devices[0].device_kind}  "
        f"processes: {jax.process_count()}",
        f"mesh: {dict(mesh.shape)}",
        f"model: {cfg.model.name}  parameters: {count_params(abstract):,}  "
        f"(param_dtype {cfg.model.param_dtype}, compute {cfg.model.dtype})",
        f"per device: parameters {params_bytes / GiB:.3f} GiB; with fp32 gradients and Adam moments "
        f"{(params_bytes + 3 * fp32_bytes) / GiB:.3f} GiB (activations not included)",
    ]
    return "\n".join(lines)
