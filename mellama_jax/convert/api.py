"""The conversions as functions: hf_to_jax, jax_to_hf (full, merged, or PEFT adapters) and verify.

Both directions stream: one tensor (one layer of a stacked parameter) is in memory at a time.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from mellama_jax.config import DEFAULT_RULES, ConfigError, LoraConfig, ModelConfig, load_config, to_dict
from mellama_jax.convert.export import export_hf, merged_fetch
from mellama_jax.convert.hf import ConversionError, HFCheckpoint, tensor_specs
from mellama_jax.convert.params_io import ParamsReader, ParamsWriter
from mellama_jax.convert.peft import export_peft

DTYPES = {"float32": np.float32, "bfloat16": "bfloat16", "float16": np.float16}


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def shard_chunks(cfg: ModelConfig, mesh_shape: dict[str, int], rules=DEFAULT_RULES) -> dict:
    """Per parameter, the shape of one device's shard on a mesh of `mesh_shape` under `rules`: used as the
    zarr chunk shape, so that restoring on that mesh reads exactly one chunk per shard. Pure arithmetic: the
    mesh need not exist here (convert for 160 GPUs on a laptop)."""
    from flax import nnx

    from mellama_jax.model import init_abstract
    from mellama_jax.sharding import logical_to_spec

    out = {}
    for path, var in nnx.to_flat_state(nnx.state(init_abstract(cfg), nnx.Param)):
        spec = tuple(logical_to_spec(var.get_metadata()["out_sharding"], rules))
        chunk = []
        for dim, axes in zip(var.shape, spec + (None,) * (len(var.shape) - len(spec))):
            axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
            ways = int(np.prod([mesh_shape.get(a, 1) for a in axes]))
            if dim % ways:
                raise ConfigError(f"{'/'.join(path)}: dimension {dim} does not divide over {axes} of size {ways}")
            chunk.append(dim // ways)
        out[tuple(path)] = tuple(chunk)
    return out


def hf_to_jax(src: str | Path, dst: str | Path, dtype: str | None = None, progress: bool = True,
              mesh_shape: dict[str, int] | None = None) -> Path:
    """A Hugging Face LLaMA directory -> a parameter checkpoint that `train.init_from` restores.

    dtype: None keeps the checkpoint's own (so HF -> JAX -> HF is bit-exact); or float32 / bfloat16.
    mesh_shape: e.g. {"fsdp": 8, "tensor": 2}: store each parameter chunked as that mesh's shards (with the
    default rule table), so a restore there reads one chunk per device shard. Any mesh can restore it.
    The output also holds model.yaml (our ModelConfig) and tokenizer.model when the source has one.
    """
    hf = HFCheckpoint(src)
    cfg = hf.config
    chunks = shard_chunks(cfg, mesh_shape) if mesh_shape else {}
    out_dtype = _np_dtype(dtype) if dtype else None
    writer = ParamsWriter(dst)
    try:
        specs = tensor_specs(cfg)
        total = sum(hf.nbytes(name) for name in hf.names)  # bytes read from the source
        with tqdm(total=total, unit="B", unit_scale=True, desc="hf-to-jax", disable=not progress) as bar:
            done = 0
            for spec in specs:
                first = hf.get(spec.hf_name.format(i=0))
                dt = out_dtype or first.dtype
                shape = ((cfg.num_layers,) if spec.stacked else ()) + spec.shape
                writer.create(spec.path, shape, dt, spec.stacked, chunks.get(spec.path))
                for i in (range(cfg.num_layers) if spec.stacked else [None]):
                    tensor = first if i in (0, None) else hf.get(spec.hf_name.format(i=i))
                    array = spec.to_jax(tensor).astype(dt, copy=False)
                    writer.write(spec.path, array, i)
                    done += 1
                    bar.update(tensor.nbytes)
                    bar.set_postfix(tensors=done, refresh=False)
                del first
        extra = {"model.yaml": yaml.safe_dump(to_dict(cfg), sort_keys=False)}
        out = writer.close(extra)
    except BaseException:
        writer.abort()
        raise
    tokenizer = Path(src) / "tokenizer.model"
    if tokenizer.exists():
        shutil.copyfile(tokenizer, out / "tokenizer.model")
    return out


def _find_model_config(src: Path) -> tuple[ModelConfig, LoraConfig | None]:
    """model.yaml beside the parameters (hf-to-jax), or the run's config.yaml (a training run's export)."""
    for candidate in (src / "model.yaml", src.parent / "config.yaml", src.parent.parent / "config.yaml",
                      src.parent.parent.parent / "config.yaml"):
        if candidate.exists():
            data = yaml.safe_load(candidate.read_text())
            if candidate.name == "model.yaml":
                return ModelConfig(**data), None
            cfg = load_config(candidate)
            return cfg.model, (cfg.lora if cfg.train.mode == "lora" else None)
    raise ConfigError(f"{src}: no model.yaml here and no run config.yaml above it; pass --model PRESET")


def _find_tokenizer(src: Path) -> Path | None:
    for candidate in (src / "tokenizer.model", src.parent / "tokenizer.model"):
        if candidate.exists():
            return candidate
    return None


def jax_to_hf(src: str | Path, dst: str | Path, model: ModelConfig | None = None,
              tokenizer: str | Path | None = None, dtype: str = "bfloat16", shard_bytes: int = 5 * 10**9,
              adapters: str | Path | None = None, merge: bool = False, progress: bool = True) -> Path:
    """A parameter checkpoint (a run's params/, a training checkpoint's state/, or hf-to-jax output) -> HF.

    adapters: a LoRA run's adapters/ directory. With merge=True the result is one full model with
    W + scale * A @ B; otherwise `dst` receives a PEFT adapter directory and `src` is not written.
    """
    src = Path(src)
    reader = ParamsReader(src)
    cfg = model or _find_model_config(src)[0]
    fetch = reader.read
    _check_params(reader, cfg)
    if adapters is not None:
        areader = ParamsReader(adapters)
        lora = _find_model_config(Path(adapters))[1]
        if lora is None:
            raise ConfigError(f"{adapters}: its run config is not a lora run")
        if not merge:
            return export_peft(areader.read, cfg, lora, dst, dtype="float32")
        fetch = merged_fetch(reader.read, areader.read, lora)
    tok = Path(tokenizer) if tokenizer else _find_tokenizer(src)
    return export_hf(fetch, cfg, dst, tok, dtype=dtype, shard_bytes=shard_bytes, progress=progress)


def _check_params(reader: ParamsReader, cfg: ModelConfig) -> None:
    for spec in tensor_specs(cfg):
        shape = ((cfg.num_layers,) if spec.stacked else ()) + spec.shape
        if spec.path not in reader.names:
            raise ConversionError(f"{reader.directory}: missing parameter {'/'.join(spec.path)}")
        if reader.shape(spec.path) != shape:
            raise ConversionError(f"{reader.directory}: parameter {'/'.join(spec.path)} has shape "
                                  f"{reader.shape(spec.path)}, the model config implies {shape}")


SAMPLE_PROMPTS = ("Metformin lowers hepatic glucose production",
                  "Patient is a 67 year old man presenting with chest pain",
                  "Question: Which enzyme do statins inhibit? Answer:")


def verify(hf_dir: str | Path, params: str | Path, prompts=SAMPLE_PROMPTS, model: ModelConfig | None = None) -> dict:
    """Logits of transformers (CPU, fp32) and of our model (JAX) on sample prompts: max |diff| and mean KL."""
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from transformers import AutoModelForCausalLM

    from mellama_jax.data.tokenizer import Tokenizer
    from mellama_jax.model import init_abstract
    from mellama_jax.train.checkpoint import load_params_local

    hf_dir, params = Path(hf_dir), Path(params)
    cfg = dataclasses.replace(model or _find_model_config(params)[0], param_dtype="float32", dtype="float32")
    tok = Tokenizer.load(hf_dir)
    if tok.vocab_size > cfg.vocab_size:
        raise ConversionError(f"{hf_dir}/tokenizer.model has {tok.vocab_size} pieces, the model only "
                              f"{cfg.vocab_size}: not this model's tokenizer")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    graphdef, abstract = nnx.split(init_abstract(cfg))
    ours = nnx.merge(graphdef, load_params_local(params, abstract))
    max_diff, kls = 0.0, []
    for prompt in prompts:
        ids = tok.encode(prompt, bos=True)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].numpy().astype(np.float64)
        got = np.asarray(ours(jnp.asarray([ids])))[0].astype(np.float64)
        max_diff = max(max_diff, float(np.abs(ref - got).max()))
        p, q = _log_softmax(ref), _log_softmax(got)
        kls.append(float(np.mean(np.sum(np.exp(p) * (p - q), -1))))
    return {"max_abs_logit_diff": max_diff, "mean_kl": float(np.mean(kls)), "prompts": len(prompts)}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    """In float64 (numpy), so KL values near zero are not float32 rounding noise."""
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
