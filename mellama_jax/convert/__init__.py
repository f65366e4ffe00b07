"""Hugging Face <-> JAX conversion."""
