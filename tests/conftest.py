"""Test setup: 8 fake CPU devices (for sharding tests) before JAX is imported anywhere; one compilation cache for
the run; the kernel battery's grid."""

import os

import pytest

# The sharding tests need exactly 8 devices: the count is forced (an XLA_FLAGS of the caller's keeps its other
# flags), and a session that still does not get 8 stops at once (pytest_sessionstart) rather than skipping them.
DEVICES = 8
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    + [f"--xla_force_host_platform_device_count={DEVICES}"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Compiling for TPU topologies loads libtpu (compile-only devices); let a parallel run or a script share it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Compiling for GPU targets (the GPU-kernel environment) loads the CUDA plugin, here without CUDA's libraries.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


def pytest_sessionstart(session):
    import jax

    found = len(jax.devices("cpu"))
    if found != DEVICES:
        raise pytest.UsageError(f"the suite needs {DEVICES} CPU devices (XLA_FLAGS="
                                f"--xla_force_host_platform_device_count={DEVICES}), jax has {found}: was jax "
                                "initialised before tests/conftest.py ran?")


# Skips that cannot hide a failure: where QWENJAX_ALLOWED_SKIPS is set (.ci/run sets it on each line), a run that
# skips a test for any reason that does not match it (a regular expression; empty: no skip allowed) fails, naming
# each test and its reason. Unset, as on a developer's machine, skips are only reported (-ra).
_ALLOWED_SKIPS = "QWENJAX_ALLOWED_SKIPS"
_skipped: dict[str, str] = {}
_unexpected: dict[str, str] = {}


def _note_skip(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        _skipped[report.nodeid or str(report.fspath)] = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)


pytest_runtest_logreport = pytest_collectreport = _note_skip


def pytest_sessionfinish(session, exitstatus):
    import re

    allowed = os.environ.get(_ALLOWED_SKIPS)
    if allowed is None or hasattr(session.config, "workerinput"):  # xdist: the controller sees every report
        return
    _unexpected.update({test: why for test, why in _skipped.items() if not (allowed and re.search(allowed, why))})
    if _unexpected and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _unexpected:
        terminalreporter.section(f"skips not allowed here ({_ALLOWED_SKIPS}={os.environ[_ALLOWED_SKIPS]!r})", red=True)
        for test, why in _unexpected.items():
            terminalreporter.write_line(f"{test}: {why}")


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
