"""Test setup: 8 fake CPU devices (for sharding tests) before JAX is imported anywhere; one compilation cache for
the run; the kernel battery's grid."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Compiling for TPU topologies loads libtpu (compile-only devices); let a parallel run or a script share it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Compiling for GPU targets (the GPU-kernel environment) loads the CUDA plugin, here without CUDA's libraries.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


def pytest_generate_tests(metafunc):
    from kernel_test_base import parametrize_battery

    parametrize_battery(metafunc)


def _share_compilations_within_the_run() -> None:
    """Tests compile the same programs again and again (every fine-tune, every fresh model); XLA's persistent
    cache, in a directory of this run's own, compiles each once. Parallel workers (pytest-xdist) inherit the
    directory through the environment from the process that made it, which alone removes it at exit: no state
    across runs. A size bound turns on jax's file lock around reads and writes, so workers never read an entry
    another is still writing."""
    import atexit
    import shutil
    import tempfile

    import jax

    cache = os.environ.get(_CACHE_ENV)
    if cache is None:
        cache = tempfile.mkdtemp(prefix="qwenjax-test-compilations-")
        os.environ[_CACHE_ENV] = cache
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_compilation_cache_max_size", 16 << 30)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


_CACHE_ENV = "QWENJAX_TEST_COMPILATION_CACHE"
_share_compilations_within_the_run()
