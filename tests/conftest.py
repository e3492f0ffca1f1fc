"""Test setup: 8 fake CPU devices (for sharding tests) before JAX is imported anywhere; one compilation cache for
the run; the kernel battery's grid."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Compiling for TPU topologies loads libtpu (compile-only devices); let a parallel run or a script share it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def pytest_generate_tests(metafunc):
    from kernel_test_base import parametrize_battery

    parametrize_battery(metafunc)


def _share_compilations_within_the_run() -> None:
    """Tests compile the same programs again and again (every fine-tune, every fresh model); XLA's persistent
    cache, in a directory of this run's own, compiles each once. Removed at exit: no state across runs."""
    import atexit
    import shutil
    import tempfile

    import jax

    cache = tempfile.mkdtemp(prefix="qwenjax-test-compilations-")
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


_share_compilations_within_the_run()
