"""The platform name the ops choose implementations by: a device's platform ("cpu", "gpu", "tpu"), with NVIDIA
Hopper GPUs (compute capability 9.x: `wgmma`, TMA, what the Mosaic GPU kernels are written for) named HOPPER."""

from __future__ import annotations

import jax

__all__ = ["HOPPER", "platform_of", "is_gpu"]

HOPPER = "gpu_sm90"


def platform_of(device: jax.Device | str | None = None) -> str:
    """`device`'s platform name (the first default device's when None); a name passes through."""
    if isinstance(device, str):
        return device
    device = device if device is not None else jax.devices()[0]
    if device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9."):
        return HOPPER
    return device.platform


def is_gpu(platform: str) -> bool:
    return platform in ("gpu", HOPPER)
