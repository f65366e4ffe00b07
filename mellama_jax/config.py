"""Typed run configuration: dataclasses loaded from YAML, with `key=value` overrides.

Every room of the system reads its part of `Config`; this module imports no other room.
Model presets live as YAML under `configs/models/` and are referenced by name (`model: {preset: llama2-13b}`),
so the numbers that define LLaMA2 are data, not code.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and the key."""


# Presets and recipes ship inside the package (importlib.resources finds them in a wheel or a checkout, where
# the top-level configs/ links here); MELLAMA_CONFIGS points at another folder of the same layout.
CONFIG_ROOT = Path(os.environ.get("MELLAMA_CONFIGS") or str(resources.files("mellama_jax") / "configs"))

_DTYPES = ("float32", "bfloat16", "float16")
_ATTENTION = ("xla", "dot_product", "cudnn", "cudnn_causal", "splash", "auto")  # model/attention.py
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "qkv_proj")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """LLaMA2 architecture and numerics. Defaults are LLaMA2-7B's."""

    name: str = "llama2-7b"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 0  # 0: hidden_size // num_heads
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    param_dtype: str = "float32"  # storage of parameters (and master weights)
    dtype: str = "float32"  # computation; recipes set bfloat16 for training
    # "xla" (reference einsum) | "dot_product" (jax.nn.dot_product_attention's XLA path) | "cudnn" (flash
    # attention, GPU) | "cudnn_causal" (flash, causal mask only) | "splash" (Pallas flash attention, TPU;
    # interpreted elsewhere) | "auto" (cudnn on GPU, splash on TPU, else xla)
    attention: str = "xla"
    # cudnn: documents per row that its packed layout has room for; a batch with a fuller row takes the
    # (exact, slower) masked kernel instead
    max_segments: int = 32
    # splash: query and key/value block sizes (tokens, multiples of 128; forward and backward alike). 512 is
    # MaxText's default: 8 x 8 blocks on a 4096-token row, so the causal half is skipped at a fine grain, and
    # every block fits the TPU's default scoped VMEM. A shorter row takes the largest block that divides it.
    splash_block_q: int = 512
    splash_block_kv: int = 512
    remat: str = "none"  # activation checkpointing policy per layer, see REMAT_POLICIES
    scan_unroll: int = 1  # layers per scan iteration; >1 trades compile time for speed
    # False: the layers run one after another, unrolled, each on its slice of the stacked weights (MaxText's
    # scan_layers): no per-layer activations stacked (and zero-filled) for the backward pass; compile time grows
    # with depth
    scan_layers: bool = True

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // max(self.num_heads, 1))

    def validate(self, where: str = "model") -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim", "max_seq_len", "scan_unroll", "max_segments", "splash_block_q", "splash_block_kv")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}.{key} must be positive, got {getattr(self, key)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{where}: num_heads={self.num_heads} is not a multiple of "
                              f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"{where}.head_dim must be even for rotary embeddings, got {self.head_dim}")
        for key in ("param_dtype", "dtype"):
            if getattr(self, key) not in _DTYPES:
                raise ConfigError(f"{where}.{key} must be one of {_DTYPES}, got {getattr(self, key)!r}")
        if self.attention not in _ATTENTION:
            raise ConfigError(f"{where}.attention must be one of {_ATTENTION}, got {self.attention!r}")
        for key in ("splash_block_q", "splash_block_kv"):
            if getattr(self, key) % 128:
                raise ConfigError(f"{where}.{key} must be a multiple of 128, got {getattr(self, key)}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"{where}.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")


LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters: y = x W + (alpha / rank) * dropout(x) A B, with B = 0 at start (PEFT's convention)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")
    base_dtype: str = "bfloat16"  # storage of the frozen base during LoRA training

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self, where: str = "lora") -> None:
        if self.rank <= 0:
            raise ConfigError(f"{where}.rank must be positive, got {self.rank}")
        if self.alpha <= 0:  # the adapters' scale alpha / rank: 0 would train adapters that change nothing
            raise ConfigError(f"{where}.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}.dropout must lie in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            raise ConfigError(f"{where}.targets: unknown {unknown}; choose from {LORA_TARGETS}")
        if self.base_dtype not in _DTYPES:
            raise ConfigError(f"{where}.base_dtype must be one of {_DTYPES}, got {self.base_dtype!r}")


# Logical axis -> mesh axes, MaxText's LLaMA layout. The first matching mesh axis that is
# not already used by another dimension of the same array wins; None replicates.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh. `ici` is the shape within a host (or slice); `dcn` across hosts. -1 = the rest."""

    ici: dict[str, int] = dataclasses.field(default_factory=lambda: {"data": 1, "fsdp": -1, "tensor": 1},
                                            metadata={"merge": True})
    dcn: dict[str, int] = dataclasses.field(default_factory=lambda: {"data": 1, "fsdp": 1, "tensor": 1},
                                            metadata={"merge": True})
    rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES

    def validate(self, where: str = "mesh") -> None:
        if list(self.ici) != list(self.dcn):
            raise ConfigError(f"{where}: ici axes {list(self.ici)} and dcn axes {list(self.dcn)} must be the same, "
                              "in the same order")
        for kind, shape in (("ici", self.ici), ("dcn", self.dcn)):
            if sum(1 for v in shape.values() if v == -1) > 1:
                raise ConfigError(f"{where}.{kind}: at most one axis may be -1, got {shape}")
            bad = {k: v for k, v in shape.items() if v == 0 or v < -1}
            if bad:
                raise ConfigError(f"{where}.{kind}: axis sizes must be positive or -1, got {bad}")
        for rule in self.rules:
            if len(rule) != 2:
                raise ConfigError(f"{where}.rules: each rule is [logical_name, mesh_axes], got {rule!r}")
            targets = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
            unknown = [t for t in targets if t is not None and t not in self.ici]
            if unknown:
                raise ConfigError(f"{where}.rules: rule {rule[0]!r} names mesh axes {unknown} not in "
                                  f"{list(self.ici)}")


_SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warmup and decay. Defaults are Me-LLaMA's continual pretraining."""

    learning_rate: float = 8e-6  # peak
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 1e-5  # not applied to norm scales (as Hugging Face's Trainer)
    schedule: str = "cosine"
    warmup_ratio: float = 0.05  # share of the run's steps spent warming up linearly from 0
    min_lr_ratio: float = 0.0  # final learning rate as a share of the peak
    clip_norm: float = 1.0  # global gradient-norm clipping; 0 disables

    def validate(self, where: str = "optimizer") -> None:
        if self.schedule not in _SCHEDULES:
            raise ConfigError(f"{where}.schedule must be one of {_SCHEDULES}, got {self.schedule!r}")
        for key in ("warmup_ratio", "min_lr_ratio", "b1", "b2"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{where}.{key} must lie in [0, 1], got {getattr(self, key)}")
        for key in ("learning_rate", "eps", "weight_decay", "clip_norm"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}.{key} must not be negative, got {getattr(self, key)}")


MODES = ("pretrain", "lora", "sft")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What is trained, on batches of what shape, for how long."""

    mode: str = "pretrain"  # pretrain (packed mixture) | lora (adapters on instructions) | sft (full, instructions)
    batch_size: int = 8  # global sequences per optimizer step, all microbatches together
    seq_len: int = 0  # 0: the model's max_seq_len
    grad_accum: int = 1  # microbatches per step, accumulated inside the jitted step
    steps: int = 0  # optimizer steps (the schedule's length); 0: from the data and `epochs`
    epochs: int = 0  # 0: the paper's choice: pretrain 1, lora 3, sft 5 under 10k examples else 3
    z_loss: float = 0.0  # weight of log(Z)^2, keeps the softmax normaliser near 1
    init_from: str = ""  # parameters to start from: `convert hf-to-jax` output or a run's params/ directory
    # A step whose loss or gradient norm is NaN or infinite leaves the parameters and optimizer state as they were
    # (Levanter's skip-step; `skipped` in the metrics), and `max_skipped_steps` of them in a row stop the run.
    # None: on for pretraining (a rare overflow at 70B scale is normal), off for lora/sft (there it is a bug).
    skip_nonfinite: bool | None = None
    max_skipped_steps: int = 5

    def validate(self, where: str = "train") -> None:
        if self.mode not in MODES:
            raise ConfigError(f"{where}.mode must be one of {MODES}, got {self.mode!r}")
        for key in ("batch_size", "grad_accum", "max_skipped_steps"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}.{key} must be positive, got {getattr(self, key)}")
        for key in ("steps", "epochs", "z_loss"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}.{key} must not be negative, got {getattr(self, key)}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"{where}: batch_size={self.batch_size} is not a multiple of "
                              f"grad_accum={self.grad_accum}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str = ""  # a directory written by `prepare pretrain` (pretrain) or `prepare instruct` (lora, sft)
    mixture: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"biomedical": 15.0, "clinical": 1.0, "general": 4.0})
    holdout_documents: int = 0  # pretrain: documents per source kept out of training for the eval loss
    eval_path: str = ""  # lora/sft: a separately prepared evaluation set
    # lora/sft: the instruction template the data must have been prepared with (`prepare instruct --template`);
    # "": any. The chat recipes name the format the model is to be used in.
    template: str = ""
    read_threads: int = 2

    def validate(self, where: str = "data") -> None:
        bad = {k: v for k, v in self.mixture.items() if v < 0}
        if bad or not any(v > 0 for v in self.mixture.values()):
            raise ConfigError(f"{where}.mixture: weights must not be negative and one must be positive, got "
                              f"{self.mixture}")
        if self.holdout_documents < 0:
            raise ConfigError(f"{where}.holdout_documents must not be negative (0: no held-out documents), got "
                              f"{self.holdout_documents}")
        if self.read_threads < 1:
            raise ConfigError(f"{where}.read_threads must be at least 1, got {self.read_threads}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500  # steps between saves (and one at the end, and one on SIGTERM/SIGINT); 0: those two only
    keep_last: int = 3  # the newest checkpoints kept; at least 1 (the one a resume needs)
    keep_every: int = 0  # also keep every step that is a multiple of this; 0: none
    async_save: bool = True

    def validate(self, where: str = "checkpoint") -> None:
        if self.every < 0:
            raise ConfigError(f"{where}.every must not be negative (0: save only at the end and on a stop), got "
                              f"{self.every}")
        if self.keep_last < 1:
            raise ConfigError(f"{where}.keep_last must be at least 1: the newest checkpoint is what a resume and "
                              f"the non-finite guard rely on, got {self.keep_last}")
        if self.keep_every < 0:
            raise ConfigError(f"{where}.keep_every must not be negative (0: keep no extra steps), got "
                              f"{self.keep_every}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"  # checkpoints/, metrics.jsonl, tensorboard/, plots, params/ or adapters/
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end (when there is an eval split)
    eval_batches: int = 8
    peak_tflops: float = 0.0  # per device, for MFU; 0: from the device kind (CPU: measured)
    progress: bool = True
    plot: bool = True

    def validate(self, where: str = "run") -> None:
        # log_every is also the non-finite guard's cadence: 0 would leave a bad step unread until a save
        for key in ("log_every", "eval_batches"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}.{key} must be at least 1, got {getattr(self, key)}")
        if self.eval_every < 0:
            raise ConfigError(f"{where}.eval_every must not be negative (0: evaluate at the end only), got "
                              f"{self.eval_every}")
        if self.peak_tflops < 0:
            raise ConfigError(f"{where}.peak_tflops must not be negative (0: from the device), got "
                              f"{self.peak_tflops}")


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    seed: int = 0

    def __post_init__(self):
        if self.train.seq_len == 0:
            object.__setattr__(self, "train", dataclasses.replace(self.train, seq_len=self.model.max_seq_len))

    @property
    def skips_nonfinite(self) -> bool:
        """Whether a non-finite step is skipped (train.skip_nonfinite, or by mode)."""
        skip = self.train.skip_nonfinite
        return self.train.mode == "pretrain" if skip is None else skip

    @property
    def adapters(self) -> LoraConfig | None:
        """The LoRA adapters this run trains (train.mode lora), else None."""
        return self.lora if self.train.mode == "lora" else None

    def validate(self) -> Config:
        if self.train.seq_len <= 0:
            raise ConfigError(f"train.seq_len must be positive, got {self.train.seq_len}")
        self.model.validate("model")
        self.mesh.validate("mesh")
        self.optimizer.validate("optimizer")
        self.train.validate("train")
        self.data.validate("data")
        self.checkpoint.validate("checkpoint")
        self.run.validate("run")
        if self.seed < 0:
            raise ConfigError(f"seed must not be negative, got {self.seed}")
        if self.train.mode == "lora":
            self.lora.validate("lora")
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len="
                              f"{self.model.max_seq_len}")
        return self


# --------------------------------------------------------------------------- loading


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
    if tp is Any:
        return tuple(value) if isinstance(value, list) else value
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
    return cfg
