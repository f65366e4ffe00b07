"""JAX parameters -> a Hugging Face LLaMA directory that `from_pretrained` loads as it is.

Tensors are pulled one at a time through a `fetch(spec, layer)` callable (from memory or, for large models,
sliced out of a checkpoint), optionally merged with LoRA adapters, cast, and streamed into sharded safetensors
files with an index. Everything is written to a temporary directory that is renamed into place at the end.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mellama_jax import storage
from mellama_jax.config import LoraConfig, ModelConfig
from mellama_jax.convert.hf import TensorSpec, tensor_specs
from mellama_jax.convert.safetensors_stream import write_streaming
from mellama_jax.dtypes import np_dtype
from mellama_jax.outputs import atomic_output

Fetch = Callable[[tuple[str, ...], int | None], np.ndarray]


def hf_config(cfg: ModelConfig, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": cfg.initializer_range,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pretraining_tp": 1,
        "torch_dtype": dtype,
        "use_cache": True,
    }


def write_tokenizer_files(tokenizer_model: str | Path, out: Path, max_len: int) -> None:
    """tokenizer.model plus the config that makes transformers add BOS (and not EOS), as LLaMA expects."""
    shutil.copyfile(tokenizer_model, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "add_bos_token": True,
                "add_eos_token": False,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": None,
                "legacy": False,
                "model_max_length": max_len,
                "clean_up_tokenization_spaces": False,
            },
            indent=1,
        )
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=1)
    )


def memory_fetch(params: dict) -> Fetch:
    """Fetch from a nested dict of arrays in our layout (as `nnx.to_pure_dict` gives)."""

    def fetch(path, layer):
        node = params
        for key in path:
            node = node[key]
        array = np.asarray(node)
        return array if layer is None else array[layer]

    return fetch


def merged_fetch(base: Fetch, adapters: Fetch, lora: LoraConfig) -> Fetch:
    """Base weights with LoRA folded in: W + scale * A @ B, per layer."""

    def fetch(path, layer):
        w = np.asarray(base(path, layer), np.float32)
        if path[-1] == "kernel" and len(path) >= 2 and path[-2] in lora.targets and layer is not None:
            a = np.asarray(adapters(path[:-1] + ("lora_a",), layer), np.float32)
            b = np.asarray(adapters(path[:-1] + ("lora_b",), layer), np.float32)
            w = w + lora.scale * (a.reshape(-1, lora.rank) @ b.reshape(lora.rank, -1)).reshape(w.shape)
        return w

    return fetch


def _plan_shards(cfg: ModelConfig, dtype: str, shard_bytes: int) -> list[list[tuple[str, TensorSpec, int | None]]]:
    itemsize = np_dtype(dtype).itemsize
    order = []
    specs = tensor_specs(cfg)
    order.append(("model.embed_tokens.weight", specs[0], None))
    for i in range(cfg.num_layers):
        order.extend((s.hf_name.format(i=i), s, i) for s in specs if s.stacked)
    order.extend((s.hf_name, s, None) for s in specs[1:] if not s.stacked)
    shards, current, size = [], [], 0
    for entry in order:
        nbytes = math.prod(entry[1].hf_shape) * itemsize
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    shards.append(current)
    return shards


def export_hf(
    fetch: Fetch,
    cfg: ModelConfig,
    out_dir: str | Path,
    tokenizer_model: str | Path | None = None,
    dtype: str = "bfloat16",
    shard_bytes: int = 5 * 10**9,
    progress: bool = False,
    overwrite: bool = False,
    inputs=(),
) -> Path:
    """Write a Hugging Face LLaMA directory; returns its path. Nothing is left behind on failure; `out_dir`
    follows artifacts' destination rule (`inputs`: folders it must not overlap)."""
    out = storage.path(out_dir)
    with atomic_output(out, "hf-model", overwrite, inputs) as tmp:
        shards = _plan_shards(cfg, dtype, shard_bytes)
        names = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
        )
        weight_map, total = {}, 0
        bar = tqdm(total=sum(len(s) for s in shards), unit="tensor", disable=not progress, desc="export")
        for name, shard in zip(names, shards):
            entries = {hf: (spec, layer) for hf, spec, layer in shard}

            def pull(hf_name):  # called by write_streaming within this iteration
                spec, layer = entries[hf_name]  # noqa: B023
                bar.update(1)
                return spec.to_hf(np.asarray(fetch(spec.path, layer)))

            total += write_streaming(
                tmp / name, [(hf, spec.hf_shape, dtype) for hf, spec, _ in shard], pull, {"format": "pt"}
            )
            weight_map.update({hf: name for hf, _, _ in shard})
        bar.close()
        if len(shards) > 1:
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
            )
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, dtype), indent=1))
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=1))
        if tokenizer_model is not None:
            write_tokenizer_files(tokenizer_model, tmp, cfg.max_seq_len)
    return out
