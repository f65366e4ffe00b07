"""Tokenisation and input pipelines."""
