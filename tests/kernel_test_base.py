"""The kernel-vs-oracle battery that every implementation of a hot op runs (tests/test_kernels.py holds the ops).

An op's test class subclasses `KernelVsOracle` and says what is particular to the op:

    IMPLEMENTATIONS   names in the op's dispatch table (`qwenjax.ops.<op>.IMPLEMENTATIONS`) that run on CPU
                      here: a new backend gets the whole battery by adding its name;
    CASES             {id: case}: dtypes, ragged and edge shapes;
    inputs(case)      -> (args, kwargs): `args` are differentiated, `kwargs` (masks, sizes, options) are not;
    run(name, case)   -> the implementation under test, called as fn(*args, **kwargs);
    oracle(case)      -> the op's pure-JAX oracle, called the same way;
    tolerance(case, implementation) -> (forward, backward): bounds on max |error| / max |oracle|, per output
                      and gradient;
    BACKWARD          False for an op that is never differentiated (a decode step);
    EXACT_ZEROS       True where the contract promises exact zeros (rows of no group, empty experts): the
                      implementation must give exactly 0 wherever the oracle does.

Each (implementation, case) checks, in one compiled program with the oracle: every output and, through a fixed
random cotangent, the gradient of every differentiated input: same shapes and dtypes, finite, within tolerance;
and no race reported by Mosaic GPU's interpreter (which prints each race and runs on).
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gpu_common import RACE_REPORT


class KernelVsOracle:
    IMPLEMENTATIONS: tuple[str, ...] = ()
    CASES: dict[str, Any] = {}
    BACKWARD = True
    EXACT_ZEROS = False

    def inputs(self, case) -> tuple[tuple, dict]:
        raise NotImplementedError

    def run(self, name: str, case) -> Callable:
        raise NotImplementedError

    def oracle(self, case) -> Callable:
        raise NotImplementedError

    def tolerance(self, case, implementation: str) -> tuple[float, float]:
        raise NotImplementedError

    def test_matches_oracle(self, implementation: str, case_id: str, capfd):
        case = self.CASES[case_id]
        args, kwargs = self.inputs(case)
        fns = [self.run(implementation, case), self.oracle(case)]
        backward = self.BACKWARD

        def outputs_and_grads(*args):
            results = []
            for fn in fns:
                if not backward:
                    results.append((fn(*args, **kwargs), ()))
                    continue
                outputs, pullback = jax.vjp(lambda *a, fn=fn: fn(*a, **kwargs), *args)
                leaves, tree = jax.tree.flatten(outputs)
                keys = jax.random.split(jax.random.key(0), len(leaves))
                cotangents = jax.tree.unflatten(tree, [jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
                                                       for k, x in zip(keys, leaves)])
                results.append((outputs, pullback(cotangents)))
            return results

        (ours, our_grads), (want, want_grads) = jax.jit(outputs_and_grads)(*args)
        assert RACE_REPORT not in capfd.readouterr().out, f"{implementation}: a kernel raced (output above)"
        forward_tol, backward_tol = self.tolerance(case, implementation)
        chex.assert_trees_all_equal_shapes_and_dtypes(ours, want)
        chex.assert_trees_all_equal_shapes_and_dtypes(our_grads, want_grads)
        for i, (a, b) in enumerate(zip(jax.tree.leaves(ours), jax.tree.leaves(want))):
            assert_matches(a, b, forward_tol, f"{implementation}: output {i}", self.EXACT_ZEROS)
        for i, (a, b) in enumerate(zip(our_grads, want_grads)):
            assert_matches(a, b, backward_tol, f"{implementation}: gradient of input {i}", self.EXACT_ZEROS)


def assert_matches(actual, expected, tol: float, what: str, exact_zeros: bool = False) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, \
        f"{what}: {actual.dtype}{list(actual.shape)} where the oracle gives {expected.dtype}{list(expected.shape)}"
    a, b = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert np.all(np.isfinite(a)), f"{what}: non-finite values"
    if exact_zeros:
        zeros = b == 0
        assert not np.any(a[zeros]), f"{what}: {np.count_nonzero(a[zeros])} values nonzero where the oracle's are 0"
    scale = np.max(np.abs(b), initial=0.0)
    if scale:
        err = np.max(np.abs(a - b)) / scale
        assert err <= tol, f"{what}: max |error| / max |oracle| = {err:.3g} > {tol}"


def parametrize_battery(metafunc) -> None:
    """conftest's `pytest_generate_tests`: the (implementation, case) grid of a KernelVsOracle class."""
    cls = metafunc.cls
    if cls is None or not issubclass(cls, KernelVsOracle):
        return
    if "implementation" in metafunc.fixturenames:  # the Mosaic GPU lines run in the GPU-kernel environment
        metafunc.parametrize("implementation", [
            pytest.param(name, marks=pytest.mark.gpu_kernels) if "gpu" in name else name
            for name in cls.IMPLEMENTATIONS])
    if "case_id" in metafunc.fixturenames:
        metafunc.parametrize("case_id", list(cls.CASES))
