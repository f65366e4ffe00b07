"""LLaMA2 in Flax NNX, with logical axis names on every parameter and key activation."""

from mellama_jax.model.llama import Llama, count_params, init_abstract

__all__ = ["Llama", "count_params", "init_abstract"]
