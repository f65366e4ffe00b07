"""mellama-jax: Me-LLaMA's continual pretraining, instruction tuning and evaluation in JAX/Flax NNX."""

__version__ = "0.1.0"
