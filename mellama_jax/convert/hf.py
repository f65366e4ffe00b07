"""The one table that relates Hugging Face LLaMA tensor names to our parameters, and a loader.

Hugging Face stores a linear layer's weight as (out_features, in_features); we store kernels as
(in..., out...) with heads split out, e.g. q_proj (H*Dh, D) <-> wq (D, H, Dh). Per-layer tensors are
stacked on a leading 'layers' axis. Both conversion directions use `tensor_specs` so they cannot drift.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open

from mellama_jax.config import ModelConfig
from mellama_jax.convert.safetensors_stream import DTYPE_NAMES
from mellama_jax.dtypes import np_dtype
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
        return (math.prod(self.shape[self.num_in :]), math.prod(self.shape[: self.num_in]))

    def to_jax(self, hf: np.ndarray) -> np.ndarray:
        return transpose2d(hf).reshape(self.shape) if self.num_in else hf

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        return transpose2d(ours.reshape(self.hf_shape[::-1])) if self.num_in else ours


def transpose2d(array: np.ndarray, block: int = 128) -> np.ndarray:
    """A contiguous transpose, in row blocks that stay in cache (faster than numpy's on large matrices),
    moving bits as unsigned integers (numpy is slow on ml_dtypes' bfloat16)."""
    view = {2: np.uint16, 4: np.uint32, 8: np.uint64}.get(array.dtype.itemsize)
    src = array.view(view) if view is not None and array.flags.c_contiguous else array
    out = np.empty(src.shape[::-1], src.dtype)
    for i in range(0, src.shape[0], block):
        out[:, i : i + block] = src[i : i + block].T
    return out.view(array.dtype) if src is not array else out


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    D, F, H, K, Dh, V = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.vocab_size,
    )
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
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_seq_len=hf.get("max_position_embeddings", 4096),
        rope_theta=float(theta),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def expected_tensors(cfg: ModelConfig, names, source: str) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Hugging Face LLaMA checkpoint for `cfg`, with its shape; a one-line error when `names`
    (what `source` holds) lacks one or has one more (RoPE's cached inv_freq aside)."""
    expected = {}
    for spec in tensor_specs(cfg):
        for i in range(cfg.num_layers) if spec.stacked else [None]:
            expected[spec.hf_name.format(i=i)] = spec.hf_shape
    missing = sorted(set(expected) - set(names))
    if missing:
        raise ConversionError(
            f"{source}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    unexpected = sorted(n for n in set(names) - set(expected) if not n.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise ConversionError(f"{source}: unexpected tensor {unexpected[0]} for a LLaMA with this config")
    return expected


def _check(spec: TensorSpec, name: str, array, source: str) -> None:
    if tuple(array.shape) != spec.hf_shape:
        raise ConversionError(
            f"{source}: tensor {name} has shape {tuple(array.shape)}, the config expects {spec.hf_shape}"
        )


def stacked_from_hf(
    cfg: ModelConfig, get: Callable[[str], np.ndarray], spec: TensorSpec, source: str = "checkpoint"
) -> np.ndarray:
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
    expected_tensors(cfg, tensors, source)
    graphdef, state = nnx.split(init_abstract(cfg))
    flat = dict(nnx.to_flat_state(state))
    dtype = np.dtype(cfg.param_dtype) if cfg.param_dtype != "bfloat16" else jax.numpy.bfloat16
    for spec in tensor_specs(cfg):
        array = stacked_from_hf(cfg, tensors.__getitem__, spec, source)
        flat[spec.path] = flat[spec.path].replace(jax.numpy.asarray(array, dtype=dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl")


class HFCheckpoint:
    """A Hugging Face LLaMA directory, validated against its config.json, read one tensor at a time.

    Pickled weights (.bin/.pth) are refused, never unpickled: they can run arbitrary code when loaded.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ConversionError(f"{self.directory}: not a directory")
        config_path = self.directory / "config.json"
        if not config_path.exists():
            raise ConversionError(f"{config_path}: missing (a Hugging Face model directory has config.json)")
        try:
            self.hf_config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ConversionError(f"{config_path}: invalid JSON ({e})") from None
        try:
            self.config = config_from_hf(self.hf_config)
        except KeyError as e:
            raise ConversionError(f"{config_path}: missing key {e}") from None
        index = self.directory / "model.safetensors.index.json"
        weight_map = self._weight_map(index)
        self._files: dict[str, object] = {}
        self._layout: dict[str, dict] = {}
        names: dict[str, str] = {}
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        for file in files:
            path = self.directory / file
            if not path.exists():
                raise ConversionError(f"{path}: listed in the index but missing")
            try:
                handle = safe_open(str(path), framework="numpy")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise ConversionError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None
            self._layout[file] = self._read_layout(path)
            self._files[file] = handle
            for name in handle.keys():
                names[name] = file
        if weight_map:
            wrong = [n for n, f in weight_map.items() if names.get(n) != f]
            if wrong:
                raise ConversionError(f"{index}: tensor {wrong[0]} is not in the file the index names")
        self.names = names
        self._validate()

    def _weight_map(self, index: Path) -> dict[str, str] | None:
        """The index's tensor -> file map; None for a single model.safetensors; else why neither is usable."""
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConversionError(f"{index}: not a safetensors index ({e})") from None
            return weight_map
        if (self.directory / "model.safetensors").exists():
            return None
        pickles = sorted(p.name for p in self.directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ConversionError(
                f"{self.directory}: only pickled weights ({', '.join(pickles)}); they are "
                "refused because unpickling can run arbitrary code. Convert them to "
                "safetensors first on a trusted machine (save_pretrained(..., "
                "safe_serialization=True))."
            )
        raise ConversionError(f"{self.directory}: no model.safetensors or model.safetensors.index.json")

    def _read_layout(self, path: Path) -> dict:
        """name -> (start, end, dtype, shape) from the header; a truncated file is an error."""
        names = {v: k for k, v in DTYPE_NAMES.items()}
        with open(path, "rb") as f:
            header_len = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(header_len))
        base = 8 + header_len
        layout = {
            k: (
                base + v["data_offsets"][0],
                base + v["data_offsets"][1],
                np_dtype(names[v["dtype"]]) if v["dtype"] in names else None,
                tuple(v["shape"]),
            )
            for k, v in header.items()
            if k != "__metadata__"
        }
        end = max((stop for _, stop, _, _ in layout.values()), default=base)
        if path.stat().st_size < end:
            raise ConversionError(f"{path}: truncated ({path.stat().st_size} bytes, header describes {end})")
        return layout

    def _validate(self) -> None:
        expected = expected_tensors(self.config, self.names, str(self.directory))
        dtypes = set()
        for name, shape in expected.items():
            sl = self._files[self.names[name]].get_slice(name)
            got = tuple(sl.get_shape())
            if got != shape:
                raise ConversionError(
                    f"{self.directory / self.names[name]}: tensor {name} has shape {got}, config.json implies {shape}"
                )
            dtypes.add(sl.get_dtype())
        if not dtypes <= {"F32", "BF16", "F16"}:
            raise ConversionError(f"{self.directory}: unsupported tensor dtypes {sorted(dtypes)}")
        self.dtypes = dtypes

    def dtype(self, name: str) -> np.dtype:
        """The dtype tensor `name` is stored in."""
        return self._layout[self.names[name]][name][2]

    def nbytes(self, name: str) -> int:
        start, end, _, _ = self._layout[self.names[name]][name]
        return end - start

    def get(self, name: str) -> np.ndarray:
        """One tensor, read with a plain read into fresh memory (a memory map would keep every page read so
        far resident and make the process's RSS grow to the checkpoint's size)."""
        file = self.names[name]
        start, end, dtype, shape = self._layout[file][name]
        with open(self.directory / file, "rb") as f:
            f.seek(start)
            buffer = bytearray(end - start)
            f.readinto(buffer)
        return np.frombuffer(buffer, dtype).reshape(shape)
