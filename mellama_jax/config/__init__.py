"""Typed run configuration: dataclasses loaded from YAML, with `key=value` overrides (schema.py: the parts, their
defaults and validation; loading.py: YAML, overrides, presets and recipes).

Every room of the system reads its part of `Config`; this package imports no other room. Model presets live as YAML
under `configs/models/` and are referenced by name (`model: {preset: llama2-13b}`), so the numbers that define
LLaMA2 are data, not code.
"""

from mellama_jax.config.loading import (
    CONFIG_ROOT,
    load_config,
    load_model_preset,
    model_config_from_file,
    parse_overrides,
    preset_path,
    read_yaml,
    recipe_path,
    to_dict,
)
from mellama_jax.config.schema import (
    DEFAULT_RULES,
    LORA_TARGETS,
    REMAT_POLICIES,
    Attention,
    CheckpointConfig,
    Choice,
    Config,
    ConfigError,
    DataConfig,
    DType,
    LoraConfig,
    MeshConfig,
    Mode,
    ModelConfig,
    OptimizerConfig,
    Remat,
    RunConfig,
    Schedule,
    TrainConfig,
)

__all__ = [
    "Attention",
    "CONFIG_ROOT",
    "CheckpointConfig",
    "Choice",
    "Config",
    "ConfigError",
    "DEFAULT_RULES",
    "DType",
    "DataConfig",
    "LORA_TARGETS",
    "LoraConfig",
    "MeshConfig",
    "Mode",
    "ModelConfig",
    "OptimizerConfig",
    "REMAT_POLICIES",
    "Remat",
    "RunConfig",
    "Schedule",
    "TrainConfig",
    "load_config",
    "load_model_preset",
    "model_config_from_file",
    "parse_overrides",
    "preset_path",
    "read_yaml",
    "recipe_path",
    "to_dict",
]
