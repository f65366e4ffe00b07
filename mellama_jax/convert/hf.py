"""The one table that relates Hugging Face LLaMA tensor names to our parameters, and a loader.

Hugging Face stores a linear layer's weight as (out_features, in_features); we store kernels as
(in..., out...) with heads split out, e.g. q_proj (H*Dh, D) <-> wq (D, H, Dh). Per-layer tensors are
stacked on a leading 'layers' axis. Both conversion directions use `tensor_specs` so they cannot drift.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import jax
import numpy as np
from flax import nnx

from mellama_jax.config import ModelConfig
from mellama_jax.model.llama import Llama, init_abstract


class ConversionError(ValueError):
    """A checkpoint that does not fit the model: names, shapes or config disagree."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    path: tuple[str, ...]  # our parameter's path in the model state
    hf_name: str  # Hugging Face name; '{i}' is the layer index for stacked parameters
    shape: tuple[int, ...]  # our shape for one layer (without the 'layers' axis)
    num_in: int  # leading dims of `shape` that are a linear layer's inputs; 0: no transpose

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_name

    @property
    def hf_shape(self) -> tuple[int, ...]:
        if not self.num_in:
            return self.shape
        return (math.prod(self.shape[self.num_in:]), math.prod(self.shape[:self.num_in]))

    def to_jax(self, hf: np.ndarray) -> np.ndarray:
        return hf.T.reshape(self.shape) if self.num_in else hf

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        return ours.reshape(self.hf_shape[::-1]).T if self.num_in else ours


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    D, F, H, K, Dh, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                         cfg.head_dim, cfg.vocab_size)
    layer = "model.layers.{i}."
    return [
        TensorSpec(("embed", "embedding"), "model.embed_tokens.weight", (V, D), 0),
        TensorSpec(("layers", "attn_norm", "scale"), layer + "input_layernorm.weight", (D,), 0),
        TensorSpec(("layers", "attn", "wq", "kernel"), layer + "self_attn.q_proj.weight", (D, H, Dh), 1),
        TensorSpec(("layers", "attn", "wk", "kernel"), layer + "self_attn.k_proj.weight", (D, K, Dh), 1),
        TensorSpec(("layers", "attn", "wv", "kernel"), layer + "self_attn.v_proj.weight", (D, K, Dh), 1),
        TensorSpec(("layers", "attn", "wo", "kernel"), layer + "self_attn.o_proj.weight", (H, Dh, D), 2),
        TensorSpec(("layers", "mlp_norm", "scale"), layer + "post_attention_layernorm.weight", (D,), 0),
        TensorSpec(("layers", "mlp", "w_gate", "kernel"), layer + "mlp.gate_proj.weight", (D, F), 1),
        TensorSpec(("layers", "mlp", "w_up", "kernel"), layer + "mlp.up_proj.weight", (D, F), 1),
        TensorSpec(("layers", "mlp", "w_down", "kernel"), layer + "mlp.down_proj.weight", (F, D), 1),
        TensorSpec(("norm", "scale"), "model.norm.weight", (D,), 0),
        TensorSpec(("lm_head", "kernel"), "lm_head.weight", (D, V), 1),
    ]


def config_from_hf(hf: Mapping, **overrides) -> ModelConfig:
    """ModelConfig from a Hugging Face LlamaConfig (its config.json as a dict)."""
    if hf.get("model_type", "llama") != "llama":
        raise ConversionError(f"expected a LLaMA config, got model_type={hf.get('model_type')!r}")
    if hf.get("tie_word_embeddings", False):
        raise ConversionError("tied embeddings are not LLaMA2's layout (tie_word_embeddings=true)")
    scaling = hf.get("rope_scaling") or (hf.get("rope_parameters") or {})
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        raise ConversionError(f"rope scaling {scaling} is not supported (LLaMA2 uses none)")
    theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    heads = hf["num_attention_heads"]
    fields = dict(
        name=hf.get("_name_or_path") or "hf-llama",
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_seq_len=hf.get("max_position_embeddings", 4096), rope_theta=float(theta),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def _check(spec: TensorSpec, name: str, array, source: str) -> None:
    if tuple(array.shape) != spec.hf_shape:
        raise ConversionError(f"{source}: tensor {name} has shape {tuple(array.shape)}, the config expects "
                              f"{spec.hf_shape}")


def stacked_from_hf(cfg: ModelConfig, get: Callable[[str], np.ndarray], spec: TensorSpec,
                    source: str = "checkpoint") -> np.ndarray:
    """Our array for `spec`, reading Hugging Face tensors one at a time through `get(name)`."""
    names = [spec.hf_name.format(i=i) for i in range(cfg.num_layers)] if spec.stacked else [spec.hf_name]
    parts = []
    for name in names:
        array = get(name)
        _check(spec, name, array, source)
        parts.append(spec.to_jax(np.asarray(array)))
    return np.stack(parts) if spec.stacked else parts[0]


def load_hf_state_dict(cfg: ModelConfig, tensors: Mapping[str, np.ndarray], source: str = "state dict") -> Llama:
    """A Llama holding the given Hugging Face tensors (numpy arrays, e.g. from a torch state_dict)."""
    expected = {spec.hf_name.format(i=i) for spec in tensor_specs(cfg)
                for i in (range(cfg.num_layers) if spec.stacked else [0])}
    missing = sorted(expected - set(tensors))
    if missing:
        raise ConversionError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(n for n in set(tensors) - expected if not n.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise ConversionError(f"{source}: unexpected tensors {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''} (not a LLaMA2 checkpoint for this config?)")
    graphdef, state = nnx.split(init_abstract(cfg))
    flat = dict(nnx.to_flat_state(state))
    dtype = np.dtype(cfg.param_dtype) if cfg.param_dtype != "bfloat16" else jax.numpy.bfloat16
    for spec in tensor_specs(cfg):
        array = stacked_from_hf(cfg, tensors.__getitem__, spec, source)
        flat[spec.path] = flat[spec.path].replace(jax.numpy.asarray(array, dtype=dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
