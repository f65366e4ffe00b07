"""Model FLOPs per token and MFU, counted as MaxText counts them.

Matmul FLOPs: 6 per multiply-accumulate-able weight per token (forward 2, backward 4) over every projection
and the LM head (the input embedding is a lookup, not a matmul). Attention: the QK^T and PV products,
4 * T * heads * head_dim per token per layer in the forward pass, halved for causal masking (MaxText's 2025
change), times 3 for forward + backward.
"""

from __future__ import annotations

from mellama_jax.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    D, F, H, K, Dh, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                         cfg.head_dim, cfg.vocab_size)
    per_layer = D * (H + 2 * K) * Dh + H * Dh * D + 3 * D * F
    return cfg.num_layers * per_layer + D * V


def train_flops_per_token(cfg: ModelConfig, seq_len: int, frozen_weights: bool = False) -> float:
    """frozen_weights (LoRA): no weight gradients, so 4 rather than 6 FLOPs per weight per token (adapters,
    a fraction of a percent of the weights, are not counted)."""
    weights = (4.0 if frozen_weights else 6.0) * matmul_params(cfg)
    attention = 3.0 * cfg.num_layers * (4.0 * seq_len * cfg.num_heads * cfg.head_dim) / 2.0
    return weights + attention


def mfu(cfg: ModelConfig, seq_len: int, tokens_per_second: float, peak_flops_per_device: float,
        num_devices: int) -> float:
    return train_flops_per_token(cfg, seq_len) * tokens_per_second / (peak_flops_per_device * num_devices)
