"""Sampling: load a model (built-in name, local directory or hub id) and turn prompts into images."""
