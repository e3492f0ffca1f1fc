"""Pallas kernels (and their pure-JAX reference oracles) for Qwen3.5."""
