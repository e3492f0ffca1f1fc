"""Test setup: 8 fake CPU devices (for sharding tests) before JAX is imported anywhere; the kernel battery's grid."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Compiling for TPU topologies loads libtpu (compile-only devices); let a parallel run or a script share it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def pytest_generate_tests(metafunc):
    from kernel_test_base import parametrize_battery

    parametrize_battery(metafunc)
