"""Experiments over many runs: sweeps of configs, and the thesis findings rerun in the shapes world."""
