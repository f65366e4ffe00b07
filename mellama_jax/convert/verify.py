"""`convert verify`: does a Hugging Face folder compute what our parameters compute?

The reference is our model holding exactly the weights the export should hold: our parameters (with a LoRA
run's adapters folded in as W + scale * A B, computed here from the model's own factors) rounded to the dtype
each tensor has in the folder's safetensors files. transformers runs the folder in fp32 (a bf16 file upcasts
exactly) and our model runs in fp32, so a faithful export differs only by fp32 rounding in differently ordered
sums, whatever the export's dtype. The tolerance is derived from that (`tolerance_for`), not from the dtype's
coarser step (on the test models a 1% change to any one tensor fails: docs/benchmarks.md). The residual stream
is compared after the embedding and after every layer (forward hooks on transformers' modules), so a failure
names the first layer that diverges.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mellama_jax.config import ModelConfig
from mellama_jax.convert.api import model_config
from mellama_jax.convert.hf import ConversionError, HFCheckpoint, tensor_specs
from mellama_jax.data.tokenizer import Tokenizer
from mellama_jax.model import init_abstract
from mellama_jax.model.layers import Dense
from mellama_jax.model.loading import load_model
from mellama_jax.options import POSITIVE_NUMBER, option

SAMPLE_PROMPTS = (
    "Metformin lowers hepatic glucose production",
    "Patient is a 67 year old man presenting with chest pain",
    "Question: Which enzyme do statins inhibit? Answer:",
)

FP32_UNIT_ROUNDOFF = 2.0**-24


def tolerance_for(cfg: ModelConfig) -> float:
    """Relative L2 difference per token allowed between two fp32 runs of the same weights.

    A dot product of length K summed in another order moves by about sqrt(K) unit roundoffs (random-walk
    rounding); the residual stream adds one such error per layer, independently, so about sqrt(L) of them
    accumulate. The factor 64 covers the softmax, norms and SiLU between the products and the spread over tokens.
    Tiny test models: ~1e-4; LLaMA2-70B (K = 28672, L = 80): ~6e-3. Where faithful exports and planted faults
    fall against it: docs/benchmarks.md."""
    widest = max(cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim)
    return 64 * FP32_UNIT_ROUNDOFF * math.sqrt(widest) * math.sqrt(cfg.num_layers + 1)


@dataclasses.dataclass(frozen=True)
class VerifyRequest:
    """One `convert verify`: what `mellama-jax convert verify` parses, and what `verify` takes."""

    hf_dir: str | Path = option(help="HF directory", metavar="src", positional=True)
    params: str | Path = option(help="parameter checkpoint", metavar="dst", positional=True)
    model: str | Path | None = option(None, "model preset or YAML (default: found beside the checkpoint)")
    adapters: str | Path | None = option(None, "a LoRA run's adapters/ over DST (for a merged export)")
    tolerance: float | None = option(
        None,
        "relative difference allowed per token and layer (default: fp32 rounding's, from the model's width and depth)",
        type=POSITIVE_NUMBER,
    )


def _merged_kernels(model) -> None:
    """Fold every LoRA factor pair into its kernel in place: W + scale * A B, per layer (stacked)."""
    for _, module in nnx.iter_graph(model):
        if isinstance(module, Dense) and getattr(module, "lora_a", None) is not None:
            a, b = module.lora_a.get_value(), module.lora_b.get_value()
            delta = jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(a, b)
            module.kernel.set_value(module.kernel.get_value() + module.lora_scale * delta)


def expected_model(params: str | Path, adapters: str | Path | None, cfg: ModelConfig, hf: HFCheckpoint):
    """Our model (fp32) with the weights the export should hold: adapters merged, each tensor rounded to its
    dtype in `hf`'s files."""
    source = load_model(params, adapters, model=cfg)
    if adapters is not None:
        _merged_kernels(source)
    flat = dict(nnx.to_flat_state(nnx.state(source, nnx.Param)))
    graphdef, abstract = nnx.split(init_abstract(dataclasses.replace(cfg, param_dtype="float32", dtype="float32")))
    target = dict(nnx.to_flat_state(abstract))
    for spec in tensor_specs(cfg):
        dtypes = {hf.dtype(spec.hf_name.format(i=i)) for i in range(cfg.num_layers if spec.stacked else 1)}
        if len(dtypes) > 1:
            raise ConversionError(
                f"{hf.directory}: {spec.hf_name} is stored in several dtypes "
                f"({sorted(map(str, dtypes))}); an export writes one"
            )
        stored = dtypes.pop()
        value = np.asarray(flat[spec.path].get_value(), np.float32).astype(stored).astype(np.float32)
        target[spec.path] = target[spec.path].replace(jnp.asarray(value))
    return nnx.merge(graphdef, nnx.from_flat_state(target))


def _relative(got: np.ndarray, ref: np.ndarray) -> float:
    """max over tokens of |got - ref| / max(|got|, |ref|) (L2 over the last axis; 1 where one side is all zero)."""
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    scale = np.maximum(np.linalg.norm(got, axis=-1), np.linalg.norm(ref, axis=-1))
    return float(np.max(np.linalg.norm(got - ref, axis=-1) / np.maximum(scale, 1e-300)))


def _hf_stream(hf_model, torch, ids) -> tuple[list[np.ndarray], np.ndarray]:
    """transformers' residual stream after the embedding and after each decoder layer, and its logits."""
    captured, handles = [], []

    def keep(_module, _inputs, output):
        captured.append((output[0] if isinstance(output, tuple) else output)[0].float().numpy())

    handles.append(hf_model.model.embed_tokens.register_forward_hook(keep))
    handles += [layer.register_forward_hook(keep) for layer in hf_model.model.layers]
    try:
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids])).logits[0].float().numpy()
    finally:
        for handle in handles:
            handle.remove()
    return captured, logits


def _stage_names(cfg: ModelConfig) -> list[str]:
    return ["embedding"] + [f"layer {i}" for i in range(cfg.num_layers)] + ["final norm and lm_head (logits)"]


SAME_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "rope_theta",
    "rms_norm_eps",
)


def _same_model_tokenizer(hf_dir: Path, hf_config: ModelConfig, cfg: ModelConfig) -> Tokenizer:
    """The export's tokenizer, once its config.json and tokenizer are found to belong to the model of these
    parameters (else why not)."""
    for key in SAME_KEYS:
        if getattr(hf_config, key) != getattr(cfg, key):
            raise ConversionError(
                f"{hf_dir}/config.json: {key} is {getattr(hf_config, key)}, the parameters' model "
                f"has {getattr(cfg, key)}: not an export of these parameters"
            )
    tok = Tokenizer.load(hf_dir)
    if tok.vocab_size > cfg.vocab_size:
        raise ConversionError(
            f"{hf_dir}/tokenizer.model has {tok.vocab_size} pieces, the model only "
            f"{cfg.vocab_size}: not this model's tokenizer"
        )
    return tok


def verify(r: VerifyRequest, *, prompts=SAMPLE_PROMPTS) -> dict:
    """Per stage (embedding, each layer, logits) the largest relative difference over the sample prompts, the
    first stage past the tolerance, and (for reading) max |logit difference| and mean KL(transformers || ours)."""
    # here, not at the top: torch and transformers come with the optional interop extra
    import torch
    from transformers import AutoModelForCausalLM

    hf_dir, params = Path(r.hf_dir), Path(r.params)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{hf_dir}: no such Hugging Face folder")
    cfg = model_config(params, r.model)
    hf = HFCheckpoint(hf_dir)
    tok = _same_model_tokenizer(hf_dir, hf.config, cfg)
    ours = expected_model(params, r.adapters, cfg, hf)
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tolerance = r.tolerance if r.tolerance is not None else tolerance_for(cfg)
    stages = np.zeros(cfg.num_layers + 2)
    max_diff, kls = 0.0, []
    for prompt in prompts:
        ids = tok.encode(prompt, bos=True)
        ref_stream, ref = _hf_stream(hf_model, torch, ids)
        stream = ours.layer_outputs(jnp.asarray([ids]))
        got = np.asarray(ours(jnp.asarray([ids])))[0]
        diffs = [_relative(np.asarray(h)[0], h_ref) for h, h_ref in zip(stream, ref_stream, strict=True)]
        stages = np.maximum(stages, diffs + [_relative(got, ref)])
        max_diff = max(max_diff, float(np.abs(ref.astype(np.float64) - got).max()))
        p, q = _log_softmax(ref.astype(np.float64)), _log_softmax(got.astype(np.float64))
        kls.append(float(np.mean(np.sum(np.exp(p) * (p - q), -1))))
    names = _stage_names(cfg)
    bad = [name for name, d in zip(names, stages) if not d <= tolerance]
    return {
        "ok": not bad,
        "first_divergent": bad[0] if bad else None,
        "tolerance": tolerance,
        "max_relative_diff": float(stages.max()),
        "relative_diff_by_stage": dict(zip(names, stages.tolist())),
        "export_dtypes": sorted(hf.dtypes),
        "max_abs_logit_diff": max_diff,
        "mean_kl": float(np.mean(kls)),
        "prompts": len(prompts),
    }


def _log_softmax(x: np.ndarray) -> np.ndarray:
    """In float64 (numpy), so KL values near zero are not float32 rounding noise."""
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
