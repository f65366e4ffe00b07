"""Optimizer, the jitted train step, FLOP accounting."""
