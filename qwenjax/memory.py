"""Does it fit? A model's weights or a generation cache, sized from shapes before anything is allocated.

A config with `vocab_size: 10**9` or a request for a billion new tokens should fail with a sentence that names the
size, not with an allocator's traceback minutes into a run (or after the machine starts swapping).
"""

from __future__ import annotations

import os
from typing import Iterable

import jax
import numpy as np
from jax.sharding import Mesh, Sharding


class OutOfMemoryError(MemoryError, ValueError):
    """What was asked for cannot fit in the devices' memory; the message names the sizes."""


def gib(n: float) -> str:
    return f"{n / 2 ** 30:,.1f} GiB"


def device_memory(device) -> int | None:
    """Bytes one device can hold: the accelerator's allocator limit; for CPU devices, the host's available
    memory (shared by all of them). None where unknown."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(what: str, arrays: Iterable[tuple[str, jax.ShapeDtypeStruct, Sharding]], mesh: Mesh) -> None:
    """Raises OutOfMemoryError when `arrays` ((name, shape/dtype, sharding) each) exceed a device's memory on
    `mesh`. CPU devices share the host's memory, so there the total over all of them counts."""
    arrays = {name: (a, sharding) for name, a, sharding in arrays}
    sizes = {name: int(np.prod(sharding.shard_shape(a.shape))) * np.dtype(a.dtype).itemsize
             for name, (a, sharding) in arrays.items()}
    per_device = sum(sizes.values())
    device = mesh.devices.flat[0]
    cpu = device.platform == "cpu"
    need = per_device * (mesh.devices.size if cpu else 1)
    have = device_memory(device)
    if have is None or need <= have:
        return
    name = max(sizes, key=sizes.get)
    a = arrays[name][0]
    where = "the host" if cpu else f"each {device.platform} device"
    per = "" if cpu else " per device"
    raise OutOfMemoryError(
        f"not enough memory for {what}: {gib(need)} needed{per}, {gib(have)} available on {where}; the largest "
        f"array is {name} {list(a.shape)} {np.dtype(a.dtype).name} ({gib(sizes[name])}{per})")
