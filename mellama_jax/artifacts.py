"""What commands read from a run or a converted model: its model config, its tokenizer, and its parameters
(with or without LoRA adapters) as a model."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

from mellama_jax.config import ConfigError, LoraConfig, ModelConfig, load_config, model_config_from_file


def _configs_above(path: Path) -> Iterator[Path]:
    for folder in (path, *list(path.parents)[:3]):
        yield folder / "config.yaml"


def find_model_config(params: str | Path) -> tuple[ModelConfig, LoraConfig | None]:
    """The model (and, for a LoRA run's adapters, the LoRA settings) of a parameter folder: its model.yaml
    (hf-to-jax output) or the config.yaml of the run it belongs to, through the validated loaders."""
    params = Path(params)
    if not params.exists():
        raise FileNotFoundError(f"{params}: no such parameter folder")
    if (params / "model.yaml").exists():
        return model_config_from_file(params / "model.yaml"), None
    for candidate in _configs_above(params):
        if candidate.exists():
            cfg = load_config(candidate)
            return cfg.model, cfg.adapters
    raise ConfigError(f"{params}: not a parameter folder of ours (no model.yaml in it, no run config.yaml above "
                      "it); convert jax-to-hf also takes --model PRESET")


def find_tokenizer(params: str | Path) -> Path | None:
    """tokenizer.model in the parameter folder, else in the run folder it belongs to (the one holding its
    config.yaml), else in that run's training data (data.path)."""
    params = Path(params)
    if (params / "tokenizer.model").exists():
        return params / "tokenizer.model"
    for candidate in _configs_above(params):
        if candidate.exists():
            if (candidate.parent / "tokenizer.model").exists():
                return candidate.parent / "tokenizer.model"
            data_dir = Path(load_config(candidate).data.path)
            return data_dir / "tokenizer.model" if (data_dir / "tokenizer.model").exists() else None
    return None


def require_tokenizer(params: str | Path, tokenizer: str | Path | None = None) -> Path:
    """`tokenizer` if given (a file or a folder holding tokenizer.model), else the one found for `params`."""
    if tokenizer:
        path = Path(tokenizer)
        path = path / "tokenizer.model" if path.is_dir() else path
        if not path.exists():
            raise FileNotFoundError(f"{tokenizer}: no tokenizer.model there")
        return path
    if not Path(params).exists():
        raise FileNotFoundError(f"{params}: no such parameter folder")
    found = find_tokenizer(params)
    if found is None:
        raise FileNotFoundError(f"{params}: no tokenizer.model beside it, in its run or in its training data; "
                                "pass --tokenizer")
    return found


def load_model(params: str | Path, adapters: str | Path | None = None, model: ModelConfig | None = None,
               dtype: str = "float32", mesh=None, rules=None):
    """Our model with the parameters of `params` (hf-to-jax output, a run's params/) in `dtype`; with `adapters` (a
    LoRA run's adapters/), `params` is the frozen base and the adapters go on top. With a `mesh` (and the rule
    table), each parameter is restored straight into its layout there, cast as it is read: no device ever holds
    the whole model (`saved_params.load_params`); without, everything goes on this host's first device."""
    import jax
    from flax import nnx

    from mellama_jax.model import init_abstract
    from mellama_jax.saved_params import load_params

    def load(path, abstract):
        if mesh is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            return load_params(path, abstract, jax.tree.map(lambda _: device, abstract))
        from mellama_jax.sharding import state_shardings

        return load_params(path, abstract, state_shardings(abstract, mesh, rules))

    cfg = dataclasses.replace(model or find_model_config(params)[0], param_dtype=dtype, dtype=dtype)
    if adapters is None:
        graphdef, abstract = nnx.split(init_abstract(cfg))
        return nnx.merge(graphdef, load(params, abstract))
    lora = adapters_config(adapters)
    graphdef, lora_abs, base_abs = nnx.split(init_abstract(cfg, lora), nnx.LoRAParam, ...)
    return nnx.merge(graphdef, load(adapters, lora_abs), load(params, base_abs))


def adapters_config(adapters: str | Path) -> LoraConfig:
    lora = find_model_config(adapters)[1]
    if lora is None:
        raise ConfigError(f"{adapters}: the run config above it is not a LoRA run")
    return lora
