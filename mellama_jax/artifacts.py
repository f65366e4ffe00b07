"""What commands read from a run or a converted model: its model config (and LoRA settings) and its tokenizer.
`model/loading.py` builds the model with its parameters from them."""

from __future__ import annotations

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
    raise ConfigError(
        f"{params}: not a parameter folder of ours (no model.yaml in it, no run config.yaml above "
        "it); convert jax-to-hf also takes --model PRESET"
    )


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
        raise FileNotFoundError(
            f"{params}: no tokenizer.model beside it, in its run or in its training data; pass --tokenizer"
        )
    return found


def adapters_config(adapters: str | Path) -> LoraConfig:
    lora = find_model_config(adapters)[1]
    if lora is None:
        raise ConfigError(f"{adapters}: the run config above it is not a LoRA run")
    return lora
