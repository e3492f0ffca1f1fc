"""Compile-only devices for the tests that compile for a TPU: a machine without libtpu skips them, saying so; a
libtpu that is installed but fails to give devices fails the test (a broken install must not read as a skip)."""

from __future__ import annotations

import importlib.util

import pytest


def require_libtpu() -> None:
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("compiling for TPU needs libtpu (the test extra installs it on Linux x86-64)")


def tpu_devices(topology: str = "v5e:2x2") -> list:
    from qwenjax import aot

    require_libtpu()
    return aot.topology_devices(topology)
