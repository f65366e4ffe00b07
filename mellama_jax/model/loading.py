"""Our model with saved parameters: a parameter checkpoint (hf-to-jax output, a run's params/), optionally with a
LoRA run's adapters over it, restored in the dtype asked for and, with a mesh, straight into its layout there."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
from flax import nnx

from mellama_jax.artifacts import adapters_config, find_model_config
from mellama_jax.config import ModelConfig
from mellama_jax.model.llama import init_abstract
from mellama_jax.saved_params import load_params
from mellama_jax.sharding import state_shardings


def load_model(
    params: str | Path,
    adapters: str | Path | None = None,
    model: ModelConfig | None = None,
    dtype: str = "float32",
    mesh=None,
    rules=None,
):
    """Our model with the parameters of `params` (hf-to-jax output, a run's params/) in `dtype`; with `adapters` (a
    LoRA run's adapters/), `params` is the frozen base and the adapters go on top. With a `mesh` (and the rule
    table), each parameter is restored straight into its layout there, cast as it is read: no device ever holds
    the whole model (`saved_params.load_params`); without, everything goes on this host's first device."""

    def load(path, abstract):
        if mesh is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            return load_params(path, abstract, jax.tree.map(lambda _: device, abstract))

        return load_params(path, abstract, state_shardings(abstract, mesh, rules))

    cfg = dataclasses.replace(model or find_model_config(params)[0], param_dtype=dtype, dtype=dtype)
    if adapters is None:
        graphdef, abstract = nnx.split(init_abstract(cfg))
        return nnx.merge(graphdef, load(params, abstract))
    lora = adapters_config(adapters)
    graphdef, lora_abs, base_abs = nnx.split(init_abstract(cfg, lora), nnx.LoRAParam, ...)
    return nnx.merge(graphdef, load(adapters, lora_abs), load(params, base_abs))
