"""Model FLOPs per token, device peaks, and MFU, counted as MaxText counts them.

Matmul FLOPs: 6 per multiply-accumulate-able weight per token (forward 2, backward 4) over every projection
and the LM head (the input embedding is a lookup, not a matmul). Attention: the QK^T and PV products,
4 * T * heads * head_dim per token per layer in the forward pass, halved for causal masking (MaxText's 2025
change), times 3 for forward + backward. MFU is those FLOPs per second over the devices' peak; the training
loop and `bench mesh` both report it through `mfu` and `peak_tflops_per_device` below.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from mellama_jax.config import LoraConfig, ModelConfig

# Dense bf16 peak per device, TFLOP/s (vendor figures without sparsity).
PEAK_TFLOPS = {
    "a100": 312.0,
    "h100": 989.0,
    "h200": 989.0,
    "tpu v4": 275.0,
    "tpu v5 lite": 197.0,
    "tpu v5e": 197.0,
    "tpu v5p": 459.0,
    "tpu v6 lite": 918.0,
}


def matmul_params(cfg: ModelConfig) -> int:
    D, F, H, K, Dh, V = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.vocab_size,
    )
    per_layer = D * (H + 2 * K) * Dh + H * Dh * D + 3 * D * F
    return cfg.num_layers * per_layer + D * V


def adapter_params(cfg: ModelConfig, lora: LoraConfig) -> int:
    """LoRA's weights: rank x (in + out) per adapted projection per layer."""
    D, F, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    sides = {
        "wq": (D, q),
        "wk": (D, kv),
        "wv": (D, kv),
        "wo": (q, D),
        "w_gate": (D, F),
        "w_up": (D, F),
        "w_down": (F, D),
    }
    return cfg.num_layers * sum(lora.rank * sum(sides[t]) for t in lora.targets)


def train_flops_per_token(cfg: ModelConfig, seq_len: int, lora: LoraConfig | None = None) -> float:
    """With `lora` (frozen base) the base weights get no gradients, so 4 rather than 6 FLOPs per weight per token,
    and the adapters, trained, 6 per weight."""
    if lora is None:
        weights = 6.0 * matmul_params(cfg)
    else:
        weights = 4.0 * matmul_params(cfg) + 6.0 * adapter_params(cfg, lora)
    attention = 3.0 * cfg.num_layers * (4.0 * seq_len * cfg.num_heads * cfg.head_dim) / 2.0
    return weights + attention


def mfu(
    cfg: ModelConfig,
    seq_len: int,
    tokens_per_second: float,
    peak_flops_per_device: float,
    num_devices: int,
    lora: LoraConfig | None = None,
) -> float:
    """Model FLOPs utilisation of `num_devices` devices processing `tokens_per_second` (0 for an unknown peak)."""
    if not peak_flops_per_device:
        return 0.0
    flops = train_flops_per_token(cfg, seq_len, lora) * tokens_per_second
    return flops / (peak_flops_per_device * num_devices)


def matmul_probe(n: int = 2048):
    """A callable that times one large fp32 square matmul on the first device and returns its TFLOP/s: the
    CPU's practical peak at that moment. A shared VM's rate drifts by 10-15% over seconds, so a benchmark
    calls it between its timed steps and compares each step with the rate measured beside it."""
    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()

    def probe() -> float:
        start = time.perf_counter()
        f(x).block_until_ready()
        return 2 * n**3 / (time.perf_counter() - start) / 1e12

    return probe


def measured_matmul_tflops(n: int = 2048, repeats: int = 5) -> float:
    """The best of `repeats` matmul_probe() calls."""
    probe = matmul_probe(n)
    return max(probe() for _ in range(repeats))


def peak_tflops_per_device(num_devices: int, configured: float = 0.0) -> float:
    """The peak an MFU is measured against: `configured` if set, the vendor's bf16 figure for known
    accelerators, on CPU the measured matmul rate split over `num_devices` (simulated CPU devices share the
    machine's cores), else 0 (MFU not reported)."""
    if configured > 0:
        return configured
    kind = jax.devices()[0].device_kind.lower()
    for name, peak in PEAK_TFLOPS.items():
        if name in kind:
            return peak
    if jax.default_backend() == "cpu":
        return measured_matmul_tflops() / num_devices
    return 0.0
