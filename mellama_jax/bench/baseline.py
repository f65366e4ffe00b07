"""`bench baseline`: our train step and transformers + torch (and PEFT for LoRA) on the same model and batch, in
the same run, so the ratio is measured side by side."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics

import jax

from mellama_jax.bench.timing import jax_step_timing, one_device, time_steps, torch_device
from mellama_jax.config import Mode, Remat, load_config
from mellama_jax.convert.export import hf_config
from mellama_jax.convert.peft import HF_TO_OURS
from mellama_jax.options import NON_NEGATIVE, POSITIVE, name_list, option, overrides


def _torch_model(cfg, device: str):
    """transformers' LlamaForCausalLM for `cfg` on `device`, with gradient checkpointing for any remat policy, and
    with train.mode=lora PEFT adapters (fp32) over a base in lora.base_dtype."""
    import torch  # the interop extra, as in torch_step_timing
    from transformers import LlamaConfig, LlamaForCausalLM

    lora = cfg.train.mode == Mode.LORA
    hf_cfg = LlamaConfig(**hf_config(cfg.model, "float32"))
    base_dtype = getattr(torch, cfg.lora.base_dtype) if lora else torch.float32
    with torch.device(device):  # initialised where it runs: a 7B-width CPU init would take longer than the steps
        model = LlamaForCausalLM(hf_cfg).to(base_dtype)
    if cfg.model.remat != Remat.NONE:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not lora:
        return model
    from peft import LoraConfig, get_peft_model

    ours_to_hf = {v: k for k, v in HF_TO_OURS.items()}
    targets = [ours_to_hf[t] for t in cfg.lora.targets]
    config = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=0.0, target_modules=targets)
    model = get_peft_model(model, config)
    for p in model.parameters():  # adapters train in fp32 over the bf16 base, as ours do
        if p.requires_grad:
            p.data = p.data.float()
    return model


def torch_step_timing(cfg, warmup: int = 2, steps: int = 5, seed: int = 0, dtype: str = "float32") -> dict:
    """transformers' LlamaForCausalLM on the same shapes as our config `cfg` (AdamW). Full training keeps fp32
    weights; train.mode=lora puts PEFT adapters with cfg.lora's rank, alpha and targets on a base stored in
    lora.base_dtype. dtype bfloat16 runs under autocast (bf16 compute over fp32 weights, as our recipes do);
    model.remat other than none turns on gradient checkpointing."""
    # here, not at the top: torch, transformers and peft come with the optional interop extra, which `--sides
    # ours` does not need
    import torch

    device = torch_device()
    torch.manual_seed(seed)
    batch, seq = cfg.train.batch_size, cfg.train.seq_len
    model = _torch_model(cfg, device)
    model.train()
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-5, betas=(0.9, 0.95), weight_decay=1e-5
    )
    ids = torch.randint(3, cfg.model.vocab_size, (batch, seq), device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()

    def run(_):
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    times, _, _ = time_steps(run, None, warmup, steps)
    median = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {
        "device": device,
        "threads": torch.get_num_threads(),
        "dtype": dtype,
        "step_s_median": median,
        "step_s_all": times,
        "tokens_per_s": batch * seq / median,
        "device_peak_bytes": peak,
        "gradient_checkpointing": cfg.model.remat != Remat.NONE,
    }


@dataclasses.dataclass(frozen=True)
class BaselineBenchRequest:
    """One `bench baseline` run: what `mellama-jax bench baseline` parses, and what `bench_baseline` takes."""

    model: str = option("bench-60m")  # a model preset
    seq: int = option(256, type=POSITIVE)
    batch: int = option(4, type=POSITIVE)
    lora_rank: int = option(8, type=NON_NEGATIVE)  # the lora row's rank (0: no lora row)
    warmup: int = option(2, type=NON_NEGATIVE)
    steps: int = option(5, type=POSITIVE)
    dtype: str = option("float32", "bfloat16: ours in bf16 compute, torch under autocast")
    overrides: tuple[str, ...] = overrides(
        "more config overrides (both sides), e.g. model.num_layers=8 "
        "lora.targets=[wq,wv] lora.base_dtype=bfloat16 model.remat=full"
    )
    sides: str = option(
        "both", "one side only (on a GPU, run each in its own process)", choices=("both", "ours", "torch")
    )
    modes: tuple[str, ...] = option(("full", "lora"), "rows to run: full, lora or both (default)", type=name_list)


def bench_baseline(r: BaselineBenchRequest) -> dict:
    """Ours (one device) and transformers (+ PEFT for lora) on the same model and batch. sides "ours" or
    "torch" runs one of them: on a GPU each needs its own process, as JAX keeps the memory it has used.
    The LoRA row's defaults (rank lora_rank, alpha 2 x rank, no dropout, fp32 base on q/k/v/o) yield to
    `overrides` such as lora.targets=[...] or lora.base_dtype=bfloat16, on both sides."""
    common = one_device(r.model, r.seq, r.batch, r.dtype)
    lora = [
        "train.mode=lora",
        f"lora.rank={r.lora_rank}",
        f"lora.alpha={2 * r.lora_rank}",
        "lora.dropout=0.0",
        "lora.base_dtype=float32",
    ]
    result = {
        "benchmark": "baseline",
        "model": r.model,
        "seq": r.seq,
        "batch": r.batch,
        "dtype": r.dtype,
        "overrides": list(r.overrides),
        "device": jax.devices()[0].device_kind,
    }
    one = [jax.devices()[0]]  # one real device: the torch side is one process on the same cores
    rows = {"full": [], "lora": lora if r.lora_rank else None}
    for mode in r.modes:
        if rows.get(mode) is None:
            continue
        settings = common + rows[mode] + list(r.overrides)
        row = {}
        if r.sides in ("both", "ours"):
            row["ours"] = jax_step_timing(settings, r.warmup, r.steps, devices=one)
        if r.sides in ("both", "torch"):
            row["torch"] = torch_step_timing(
                load_config(None, ["train.steps=1"] + settings), r.warmup, r.steps, dtype=r.dtype
            )
        if len(row) == 2:
            row["speedup"] = row["ours"]["tokens_per_s"] / row["torch"]["tokens_per_s"]
        result[mode] = row
    return result
