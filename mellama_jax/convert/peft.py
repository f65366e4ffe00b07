"""LoRA adapters <-> PEFT's format (adapter_config.json + adapter_model.safetensors).

PEFT stores, per adapted linear layer, lora_A.weight (r, in) and lora_B.weight (out, r) under
`base_model.model.<module>`; ours are lora_a (in..., r) and lora_b (r, out...), stacked over layers.
The scale alpha / r is the same convention on both sides.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from mellama_jax import storage
from mellama_jax.config import LoraConfig, ModelConfig
from mellama_jax.convert.hf import ConversionError, TensorSpec, tensor_specs
from mellama_jax.convert.safetensors_stream import write_streaming
from mellama_jax.outputs import atomic_output

PREFIX = "base_model.model."


def _targets(cfg: ModelConfig, lora: LoraConfig) -> list[TensorSpec]:
    return [s for s in tensor_specs(cfg) if s.stacked and s.num_in and s.path[-2] in lora.targets]


def _module(spec: TensorSpec) -> str:
    return spec.hf_name[: -len(".weight")]


def _adapter_tensors(cfg: ModelConfig, lora: LoraConfig) -> dict:
    """PEFT tensor name -> (its shape, our parameter path, layer, our array -> PEFT's layout)."""
    entries = {}
    for spec in _targets(cfg, lora):
        fan_in, fan_out = spec.hf_shape[1], spec.hf_shape[0]
        for i in range(cfg.num_layers):
            module = PREFIX + _module(spec).format(i=i)
            entries[module + ".lora_A.weight"] = (
                (lora.rank, fan_in),
                spec.path[:-1] + ("lora_a",),
                i,
                lambda a: a.reshape(-1, lora.rank).T,
            )
            entries[module + ".lora_B.weight"] = (
                (fan_out, lora.rank),
                spec.path[:-1] + ("lora_b",),
                i,
                lambda b: b.reshape(lora.rank, -1).T,
            )
    return entries


def adapter_config(cfg: ModelConfig, lora: LoraConfig, base_model: str) -> dict:
    """PEFT's adapter_config.json for our LoRA settings."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted({s.hf_name.split(".")[-2] for s in _targets(cfg, lora)}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
    }


def export_peft(
    fetch: Callable,
    cfg: ModelConfig,
    lora: LoraConfig,
    out_dir: str | Path,
    base_model: str = "",
    dtype: str = "float32",
    overwrite: bool = False,
    inputs=(),
) -> Path:
    """fetch(path, layer) gives our lora_a / lora_b arrays; writes a PEFT adapter directory atomically
    (artifacts' destination rule)."""
    out = storage.path(out_dir)
    with atomic_output(out, "peft-adapter", overwrite, inputs) as tmp:
        entries = _adapter_tensors(cfg, lora)
        write_streaming(
            tmp / "adapter_model.safetensors",
            [(name, shape, dtype) for name, (shape, *_) in entries.items()],
            lambda name: entries[name][3](np.asarray(fetch(entries[name][1], entries[name][2]))),
            {"format": "pt"},
        )
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config(cfg, lora, base_model), indent=1))
    return out


HF_TO_OURS = {
    "q_proj": "wq",
    "k_proj": "wk",
    "v_proj": "wv",
    "o_proj": "wo",
    "gate_proj": "w_gate",
    "up_proj": "w_up",
    "down_proj": "w_down",
}


def import_peft(adapter_dir: str | Path, cfg: ModelConfig) -> tuple[LoraConfig, dict]:
    """A PEFT LoRA adapter as (LoraConfig, nested dict of our stacked lora_a / lora_b arrays)."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.exists():
        raise ConversionError(f"{config_path}: missing (not a PEFT adapter directory)")
    conf = json.loads(config_path.read_text())
    if conf.get("peft_type") != "LORA" or conf.get("use_dora") or conf.get("use_rslora"):
        raise ConversionError(f"{config_path}: only plain LoRA adapters are supported")
    modules = conf["target_modules"]
    modules = [modules] if isinstance(modules, str) else modules
    unknown = [m for m in modules if m not in HF_TO_OURS]
    if unknown:
        raise ConversionError(f"{config_path}: target modules {unknown} are not LLaMA projections")
    lora = LoraConfig(
        rank=conf["r"],
        alpha=float(conf["lora_alpha"]),
        dropout=float(conf.get("lora_dropout", 0)),
        targets=tuple(HF_TO_OURS[m] for m in modules),
    )
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not weights_path.exists():
        raise ConversionError(f"{weights_path}: missing (pickled adapter_model.bin files are refused)")
    tensors = load_file(str(weights_path))
    tree: dict = {}
    for spec in _targets(cfg, lora):
        a_parts, b_parts = [], []
        for i in range(cfg.num_layers):
            module = PREFIX + _module(spec).format(i=i)
            try:
                a, b = tensors[module + ".lora_A.weight"], tensors[module + ".lora_B.weight"]
            except KeyError as e:
                raise ConversionError(f"{weights_path}: missing tensor {e.args[0]}") from None
            in_shape, out_shape = spec.shape[: spec.num_in], spec.shape[spec.num_in :]
            a_parts.append(a.T.reshape(in_shape + (lora.rank,)))
            b_parts.append(b.T.reshape((lora.rank,) + out_shape))
        node = tree
        for key in spec.path[:-2]:
            node = node.setdefault(key, {})
        node[spec.path[-2]] = {"lora_a": np.stack(a_parts), "lora_b": np.stack(b_parts)}
    return lora, tree
