"""The run configuration from YAML and `key=value` overrides: types coerced to the schema's (an error names the
file or the override, and the key), model presets expanded by name, recipes found by name."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mellama_jax.config.schema import Choice, Config, ConfigError, ModelConfig

# Presets and recipes ship inside the package (importlib.resources finds them in a wheel or a checkout, where
# the top-level configs/ links here); MELLAMA_CONFIGS points at another folder of the same layout.
CONFIG_ROOT = Path(os.environ.get("MELLAMA_CONFIGS") or str(resources.files("mellama_jax") / "configs"))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to the annotated field type, or fail naming `where`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp)
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        return tuple(value)
    return _coerce_leaf(value, tp, where)


def _coerce_leaf(value: Any, tp: Any, where: str) -> Any:
    """`_coerce` for a type that holds no other: Any, a Choice, bool, int, float, str."""
    if tp is Any:
        return tuple(value) if isinstance(value, list) else value
    if isinstance(tp, type) and issubclass(tp, Choice):
        return tp(value) if value in tp.values() else value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    data = dict(data)
    for f in dataclasses.fields(cls):
        # A partial mapping (mesh.ici.tensor=2) updates the default mapping instead of replacing it.
        if f.metadata.get("merge") and isinstance(data.get(f.name), dict):
            data[f.name] = {**f.default_factory(), **data[f.name]}
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def preset_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    path = CONFIG_ROOT / "models" / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (CONFIG_ROOT / "models").glob("*.yaml"))
        raise ConfigError(f"unknown model preset {name!r} (looked for {path}); known presets: {known}")
    return path


def model_config_from_file(path: str | Path) -> ModelConfig:
    """A ModelConfig from a YAML file of its keys (a preset, or the model.yaml that conversions write)."""
    cfg = _build(ModelConfig, read_yaml(path), str(path))
    cfg.validate(str(path))
    return cfg


def load_model_preset(name: str) -> ModelConfig:
    """A model preset by name (`llama2-70b`) or YAML path."""
    return model_config_from_file(preset_path(name))


def _set_dotted(data: dict, dotted: str, value: Any, where: str) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if key == "model" and node is data and isinstance(child, str):  # model=NAME, then model.x=...
            child = node[key] = {"preset": child}
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: cannot set {dotted!r}: {key!r} is not a mapping")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> list[tuple[str, Any]]:
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from None
        parsed.append((key.strip(), value))
    return parsed


def _resolve_model(data: dict, where: str) -> dict:
    """`model: {preset: NAME, ...}` expands to the preset's keys, then the given ones on top."""
    model = data.get("model")
    if isinstance(model, str):
        model = {"preset": model}
    if isinstance(model, dict) and "preset" in model:
        model = dict(model)
        base = read_yaml(preset_path(model.pop("preset")))
        base.update(model)
        data = dict(data, model=base)
    elif model is not None and not isinstance(model, dict):
        raise ConfigError(f"{where}: model must be a preset name or a mapping, got {model!r}")
    return data


def recipe_path(name: str | Path) -> Path:
    """A config file, or the name of a recipe shipped with the package (`me-llama-13b-pretrain`)."""
    path = Path(name)
    if path.exists() or path.suffix in (".yaml", ".yml") and path.parent != Path("."):
        return path
    shipped = CONFIG_ROOT / f"{path.stem if path.suffix in ('.yaml', '.yml') else path.name}.yaml"
    if shipped.exists():
        return shipped
    known = sorted(p.stem for p in CONFIG_ROOT.glob("*.yaml"))
    raise ConfigError(f"{name}: no such config file, nor a shipped recipe (known: {known})")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Config from a YAML file or shipped recipe name (or the defaults) with `a.b=value` overrides on top."""
    path = recipe_path(path) if path else None
    where = str(path) if path else "<defaults>"
    data = read_yaml(path) if path else {}
    if isinstance(data.get("model"), str):  # so that model.x=... overrides can refine a preset name
        data["model"] = {"preset": data["model"]}
    parsed = parse_overrides(overrides)
    for key, value in parsed:
        _set_dotted(data, key, value, where)
    try:
        return _build(Config, _resolve_model(data, where), where).validate()
    except ConfigError as e:
        raise _blame_override(e, where, [k for k, _ in parsed]) from None


def _blame_override(error: ConfigError, where: str, keys: list[str]) -> ConfigError:
    """An error about a key that an override set names the override, not the YAML file it was applied to."""
    message = str(error)
    for key in reversed(keys):  # the last override of a key is the one that counts
        parent, _, leaf = key.rpartition(".")
        if key in message or (parent and f"{parent}:" in message and (repr(leaf) in message or f" {leaf}=" in message)):
            return ConfigError(f"override {key}: " + message.replace(f"{where}.", "").replace(f"{where}: ", ""))
    return error


def to_dict(cfg: Any) -> Any:
    """Plain data (for YAML/JSON dumps and checkpoints)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Choice):
        return cfg.value  # YAML's safe dumper takes plain text only
    return cfg
