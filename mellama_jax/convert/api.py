"""The conversions as functions: hf_to_jax, jax_to_hf (full, merged, or PEFT adapters) and verify.

Both directions stream: one tensor (one layer of a stacked parameter) is in memory at a time.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import yaml
from flax import nnx
from tqdm import tqdm

from mellama_jax import storage
from mellama_jax.artifacts import adapters_config, find_model_config, require_tokenizer
from mellama_jax.config import DEFAULT_RULES, ConfigError, ModelConfig, load_model_preset, to_dict
from mellama_jax.convert.export import export_hf, merged_fetch
from mellama_jax.convert.hf import ConversionError, HFCheckpoint, tensor_specs
from mellama_jax.convert.params_io import ParamsReader, ParamsWriter
from mellama_jax.convert.peft import export_peft
from mellama_jax.dtypes import np_dtype
from mellama_jax.model import init_abstract
from mellama_jax.options import option, size
from mellama_jax.outputs import atomic_output, check_destination
from mellama_jax.sharding import logical_to_spec, parse_layout, shard_shape


def shard_chunks(cfg: ModelConfig, mesh_shape: dict[str, int], rules=DEFAULT_RULES) -> dict:
    """Per parameter, the shape of one device's shard on a mesh of `mesh_shape` under `rules`: used as the
    zarr chunk shape, so that restoring on that mesh reads exactly one chunk per shard. Pure arithmetic: the
    mesh need not exist here (convert for 160 GPUs on a laptop)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(init_abstract(cfg), nnx.Param)):
        logical = var.get_metadata()["out_sharding"]
        out[tuple(path)] = shard_shape("/".join(path), var.shape, logical_to_spec(logical, rules), mesh_shape, logical)
    return out


@dataclasses.dataclass(frozen=True)
class ImportRequest:
    """One `convert hf-to-jax`: what `mellama-jax convert hf-to-jax` parses, and what `hf_to_jax` takes."""

    src: str | Path = option(positional=True)  # a Hugging Face LLaMA folder (safetensors)
    dst: str | Path = option(positional=True)  # follows the destination rule (outputs.py)
    dtype: str | None = option(
        None, "default: keep the checkpoint's dtype (bit-exact round trips)", choices=["float32", "bfloat16", "float16"]
    )
    # each parameter is stored chunked as that mesh's shards (with the default rule table), so a restore there
    # reads one chunk per device shard. Any mesh can restore it.
    mesh: str | None = option(None, "store pre-sharded for a mesh, e.g. fsdp=8,tensor=2 (default rule table)")
    overwrite: bool = option(False, "replace an earlier hf-to-jax output at DST")


def hf_to_jax(r: ImportRequest, *, progress: bool = True) -> Path:
    """A Hugging Face LLaMA directory -> a parameter checkpoint that `train.init_from` restores. The output also
    holds model.yaml (our ModelConfig) and tokenizer.model when the source has one."""
    check_destination(r.dst, "params", r.overwrite, inputs=[r.src])  # before a bucket's model is fetched
    src, dst = storage.fetch(r.src), r.dst  # a folder in a bucket is read from the local cache (storage.py)
    hf = HFCheckpoint(src)
    cfg = hf.config
    chunks = shard_chunks(cfg, parse_layout(r.mesh)) if r.mesh else {}
    out_dtype = np_dtype(r.dtype) if r.dtype else None
    with atomic_output(dst, "params", r.overwrite, inputs=[r.src]) as tmp:
        writer = ParamsWriter(tmp)
        specs = tensor_specs(cfg)
        total = sum(hf.nbytes(name) for name in hf.names)  # bytes read from the source
        with tqdm(total=total, unit="B", unit_scale=True, desc="hf-to-jax", disable=not progress) as bar:
            done = 0
            for spec in specs:
                first = hf.get(spec.hf_name.format(i=0))
                dt = out_dtype or first.dtype
                shape = ((cfg.num_layers,) if spec.stacked else ()) + spec.shape
                writer.create(spec.path, shape, dt, spec.stacked, chunks.get(spec.path))
                for i in range(cfg.num_layers) if spec.stacked else [None]:
                    tensor = first if i in (0, None) else hf.get(spec.hf_name.format(i=i))
                    array = spec.to_jax(tensor).astype(dt, copy=False)
                    writer.write(spec.path, array, i)
                    done += 1
                    bar.update(tensor.nbytes)
                    bar.set_postfix(tensors=done, refresh=False)
                del first
        writer.close({"model.yaml": yaml.safe_dump(to_dict(cfg), sort_keys=False)})
        tokenizer = src / "tokenizer.model"
        if tokenizer.exists():
            shutil.copyfile(tokenizer, tmp / "tokenizer.model")
    return dst


@dataclasses.dataclass(frozen=True)
class ExportRequest:
    """One `convert jax-to-hf`: what `mellama-jax convert jax-to-hf` parses, and what `jax_to_hf` takes."""

    src: str | Path = option(help="a run's params/, a checkpoint's state/, or hf-to-jax output", positional=True)
    dst: str | Path = option(positional=True)
    model: str | Path | None = option(None, "model preset or YAML (default: model.yaml or the run's config.yaml)")
    tokenizer: str | Path | None = option(None, "tokenizer.model (default: found beside SRC)")
    dtype: str = option("bfloat16", choices=["bfloat16", "float16", "float32"])
    shard_size: int = option(5 * 10**9, "safetensors shard size, e.g. 5GB, 500MB", type=size)
    # with adapters, dst receives a PEFT adapter folder (src is not written), or with merge one full model with
    # W + scale * A @ B
    adapters: str | Path | None = option(None, "a LoRA run's adapters/: write PEFT adapters (or --merge)")
    merge: bool = option(False, "fold the adapters into a full model")
    overwrite: bool = option(False, "replace an earlier jax-to-hf output at DST")


def model_config(params: Path, preset: str | None) -> ModelConfig:
    """The model of `params`: the named preset if given, else the one its folder or run records."""
    return load_model_preset(preset) if preset else find_model_config(params)[0]


def jax_to_hf(r: ExportRequest, *, progress: bool = True) -> Path:
    """A parameter checkpoint -> a Hugging Face folder, or PEFT adapters."""
    if r.merge and not r.adapters:
        raise ConfigError("--merge needs --adapters (the LoRA run's adapters/ to fold in)")
    # from a bucket: fetched with the run files above them (config.yaml, tokenizer.model) that name the model
    src = storage.fetch(r.src, context=3)
    adapters = storage.fetch(r.adapters, context=3) if r.adapters else None
    cfg = model_config(src, r.model)
    reader = ParamsReader(src)
    fetch = reader.read
    _check_params(reader, cfg)
    inputs = [r.src, r.adapters]
    if adapters is not None:
        areader = ParamsReader(adapters)
        lora = adapters_config(adapters)
        _check_adapters(areader, cfg, lora)
        if not r.merge:
            return export_peft(areader.read, cfg, lora, r.dst, dtype="float32", overwrite=r.overwrite, inputs=inputs)
        fetch = merged_fetch(reader.read, areader.read, lora)
    tok = require_tokenizer(src, r.tokenizer)
    return export_hf(
        fetch,
        cfg,
        r.dst,
        tok,
        dtype=r.dtype,
        shard_bytes=r.shard_size,
        progress=progress,
        overwrite=r.overwrite,
        inputs=inputs,
    )


def _check_shapes(reader: ParamsReader, expected: dict, what: str) -> None:
    for path, shape in expected.items():
        if path not in reader.names:
            raise ConversionError(f"{reader.directory}: missing {what} {'/'.join(path)}")
        if reader.shape(path) != shape:
            raise ConversionError(
                f"{reader.directory}: {what} {'/'.join(path)} has shape {reader.shape(path)}, "
                f"the model config implies {shape} (another model size?)"
            )


def _check_params(reader: ParamsReader, cfg: ModelConfig) -> None:
    _check_shapes(
        reader, {s.path: ((cfg.num_layers,) if s.stacked else ()) + s.shape for s in tensor_specs(cfg)}, "parameter"
    )


def _check_adapters(reader: ParamsReader, cfg: ModelConfig, lora) -> None:
    expected = {}
    for s in tensor_specs(cfg):
        if s.stacked and s.num_in and s.path[-2] in lora.targets:
            ins, outs = s.shape[: s.num_in], s.shape[s.num_in :]
            expected[s.path[:-1] + ("lora_a",)] = (cfg.num_layers, *ins, lora.rank)
            expected[s.path[:-1] + ("lora_b",)] = (cfg.num_layers, lora.rank, *outs)
    _check_shapes(reader, expected, "adapter")
