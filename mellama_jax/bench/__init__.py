"""Benchmarks: side-by-side measurements with JSON output."""
