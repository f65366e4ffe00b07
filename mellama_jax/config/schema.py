"""The run configuration's schema: one frozen dataclass per part of the system (model, mesh, optimizer, train, lora,
data, checkpoint, run), the defaults that match the paper, each part's validation, and the choices as enums.
Loading it from YAML and overrides is `loading.py`'s job."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and the key."""


class Choice(enum.StrEnum):
    """A field's choices. A member equals its text (`Mode.LORA == "lora"`), so YAML and `key=value` overrides give
    plain text, which loading turns into the member (an unknown one is left for `validate` to name)."""

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class DType(Choice):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class Attention(Choice):
    """model/attention.py's implementations."""

    XLA = "xla"  # the reference einsum
    DOT_PRODUCT = "dot_product"  # jax.nn.dot_product_attention's XLA path
    CUDNN = "cudnn"  # flash attention (GPU), documents as packed segments
    CUDNN_CAUSAL = "cudnn_causal"  # flash attention, causal mask only
    SPLASH = "splash"  # Pallas flash attention (TPU; interpreted elsewhere)
    AUTO = "auto"  # cudnn on a GPU, splash on a TPU, else xla


class Remat(Choice):
    """Activation checkpointing per layer (model/llama.py)."""

    NONE = "none"
    FULL = "full"
    DOTS = "dots"
    DOTS_NO_BATCH = "dots_no_batch"
    QKV_PROJ = "qkv_proj"
    OFFLOAD = "offload"


class Schedule(Choice):
    COSINE = "cosine"
    LINEAR = "linear"
    CONSTANT = "constant"


class Mode(Choice):
    PRETRAIN = "pretrain"  # packed mixture
    LORA = "lora"  # adapters on instructions
    SFT = "sft"  # full weights on instructions


REMAT_POLICIES = Remat.values()


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
    param_dtype: DType = DType.FLOAT32  # storage of parameters (and master weights)
    dtype: DType = DType.FLOAT32  # computation; recipes set bfloat16 for training
    attention: Attention = Attention.XLA
    # cudnn: documents per row that its packed layout has room for; a batch with a fuller row takes the
    # (exact, slower) masked kernel instead
    max_segments: int = 32
    # splash: query and key/value block sizes (tokens, multiples of 128; forward and backward alike). 512 is
    # MaxText's default: 8 x 8 blocks on a 4096-token row, so the causal half is skipped at a fine grain, and
    # every block fits the TPU's default scoped VMEM. A shorter row takes the largest block that divides it.
    splash_block_q: int = 512
    splash_block_kv: int = 512
    remat: Remat = Remat.NONE
    scan_unroll: int = 1  # layers per scan iteration; >1 trades compile time for speed
    # False: the layers run one after another, unrolled, each on its slice of the stacked weights (MaxText's
    # scan_layers): no per-layer activations stacked (and zero-filled) for the backward pass; compile time grows
    # with depth
    scan_layers: bool = True

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // max(self.num_heads, 1))

    def validate(self, where: str = "model") -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_seq_len",
            "scan_unroll",
            "max_segments",
            "splash_block_q",
            "splash_block_kv",
        )
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}.{key} must be positive, got {getattr(self, key)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{where}: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"{where}.head_dim must be even for rotary embeddings, got {self.head_dim}")
        for key in ("param_dtype", "dtype"):
            if getattr(self, key) not in DType.values():
                raise ConfigError(f"{where}.{key} must be one of {DType.values()}, got {getattr(self, key)!r}")
        if self.attention not in Attention.values():
            raise ConfigError(f"{where}.attention must be one of {Attention.values()}, got {self.attention!r}")
        for key in ("splash_block_q", "splash_block_kv"):
            if getattr(self, key) % 128:
                raise ConfigError(f"{where}.{key} must be a multiple of 128, got {getattr(self, key)}")
        if self.remat not in Remat.values():
            raise ConfigError(f"{where}.remat must be one of {Remat.values()}, got {self.remat!r}")


LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters: y = x W + (alpha / rank) * dropout(x) A B, with B = 0 at start (PEFT's convention)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")
    base_dtype: DType = DType.BFLOAT16  # storage of the frozen base during LoRA training

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
        if self.base_dtype not in DType.values():
            raise ConfigError(f"{where}.base_dtype must be one of {DType.values()}, got {self.base_dtype!r}")


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

    ici: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"data": 1, "fsdp": -1, "tensor": 1}, metadata={"merge": True}
    )
    dcn: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"data": 1, "fsdp": 1, "tensor": 1}, metadata={"merge": True}
    )
    rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES

    def validate(self, where: str = "mesh") -> None:
        if list(self.ici) != list(self.dcn):
            raise ConfigError(
                f"{where}: ici axes {list(self.ici)} and dcn axes {list(self.dcn)} must be the same, in the same order"
            )
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
                raise ConfigError(f"{where}.rules: rule {rule[0]!r} names mesh axes {unknown} not in {list(self.ici)}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warmup and decay. Defaults are Me-LLaMA's continual pretraining."""

    learning_rate: float = 8e-6  # peak
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 1e-5  # not applied to norm scales (as Hugging Face's Trainer)
    schedule: Schedule = Schedule.COSINE
    warmup_ratio: float = 0.05  # share of the run's steps spent warming up linearly from 0
    min_lr_ratio: float = 0.0  # final learning rate as a share of the peak
    clip_norm: float = 1.0  # global gradient-norm clipping; 0 disables

    def validate(self, where: str = "optimizer") -> None:
        if self.schedule not in Schedule.values():
            raise ConfigError(f"{where}.schedule must be one of {Schedule.values()}, got {self.schedule!r}")
        for key in ("warmup_ratio", "min_lr_ratio", "b1", "b2"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{where}.{key} must lie in [0, 1], got {getattr(self, key)}")
        for key in ("learning_rate", "eps", "weight_decay", "clip_norm"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}.{key} must not be negative, got {getattr(self, key)}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What is trained, on batches of what shape, for how long."""

    mode: Mode = Mode.PRETRAIN
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
        if self.mode not in Mode.values():
            raise ConfigError(f"{where}.mode must be one of {Mode.values()}, got {self.mode!r}")
        for key in ("batch_size", "grad_accum", "max_skipped_steps"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}.{key} must be positive, got {getattr(self, key)}")
        for key in ("steps", "epochs", "z_loss"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}.{key} must not be negative, got {getattr(self, key)}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"{where}: batch_size={self.batch_size} is not a multiple of grad_accum={self.grad_accum}"
            )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str = ""  # a directory written by `prepare pretrain` (pretrain) or `prepare instruct` (lora, sft)
    mixture: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"biomedical": 15.0, "clinical": 1.0, "general": 4.0}
    )
    holdout_documents: int = 0  # pretrain: documents per source kept out of training for the eval loss
    eval_path: str = ""  # lora/sft: a separately prepared evaluation set
    # lora/sft: the instruction template the data must have been prepared with (`prepare instruct --template`);
    # "": any. The chat recipes name the format the model is to be used in.
    template: str = ""
    read_threads: int = 2

    def validate(self, where: str = "data") -> None:
        bad = {k: v for k, v in self.mixture.items() if v < 0}
        if bad or not any(v > 0 for v in self.mixture.values()):
            raise ConfigError(
                f"{where}.mixture: weights must not be negative and one must be positive, got {self.mixture}"
            )
        if self.holdout_documents < 0:
            raise ConfigError(
                f"{where}.holdout_documents must not be negative (0: no held-out documents), got "
                f"{self.holdout_documents}"
            )
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
            raise ConfigError(
                f"{where}.every must not be negative (0: save only at the end and on a stop), got {self.every}"
            )
        if self.keep_last < 1:
            raise ConfigError(
                f"{where}.keep_last must be at least 1: the newest checkpoint is what a resume and "
                f"the non-finite guard rely on, got {self.keep_last}"
            )
        if self.keep_every < 0:
            raise ConfigError(
                f"{where}.keep_every must not be negative (0: keep no extra steps), got {self.keep_every}"
            )


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
            raise ConfigError(
                f"{where}.eval_every must not be negative (0: evaluate at the end only), got {self.eval_every}"
            )
        if self.peak_tflops < 0:
            raise ConfigError(f"{where}.peak_tflops must not be negative (0: from the device), got {self.peak_tflops}")


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
        return self.train.mode == Mode.PRETRAIN if skip is None else skip

    @property
    def adapters(self) -> LoraConfig | None:
        """The LoRA adapters this run trains (train.mode lora), else None."""
        return self.lora if self.train.mode == Mode.LORA else None

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
        if self.train.mode == Mode.LORA:
            self.lora.validate("lora")
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        return self
