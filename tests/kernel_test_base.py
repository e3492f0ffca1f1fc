"""The kernel-vs-oracle battery that every implementation of a hot op runs (tests/test_kernels.py holds the ops).

An op's test class subclasses `KernelVsOracle` and says what is particular to the op:

    IMPLEMENTATIONS   names in the op's dispatch table (`qwenjax.ops.<op>.IMPLEMENTATIONS`) that run on CPU
                      here: a new backend gets the whole battery by adding its name;
    CASES             {id: case}: dtypes, ragged and edge shapes;
    KERNELS           {implementation: KernelCall}: the lines that must reach a Mosaic kernel (default: the TPU
                      and GPU interpreted lines); an implementation named "pallas..." must be listed;
    covers(implementation, case) -> False where the implementation sends the case to a fallback by design (fp32
                      to XLA on a GPU, ...): no line for it there; the fallback has its own line under its name;
    inputs(case)      -> (args, kwargs): `args` are differentiated, `kwargs` (masks, sizes, options) are not;
    run(name, case)   -> the implementation under test, called as fn(*args, **kwargs);
    oracle(case)      -> the op's pure-JAX oracle, called the same way;
    tolerance(case, implementation) -> (forward, backward): bounds on max |error| / max |oracle|, each one bound
                      for every output (gradient) or a tuple, one per output (differentiated input);
    BACKWARD          False for an op that is never differentiated (a decode step);
    EXACT_ZEROS       True where the contract promises exact zeros (rows of no group, empty experts): the
                      implementation must give exactly 0 wherever the oracle does.

Each (implementation, case) checks, in one compiled program with the oracle: every output and, through a fixed
random cotangent, the gradient of every differentiated input: same shapes and dtypes, finite, within tolerance;
and no race reported by Mosaic GPU's interpreter (which prints each race and runs on). A kernel line also checks
that it ran a kernel: its own program calls the interpreter (Python callbacks, which no XLA path has), and the
same program with the compiled implementation, lowered for the kernel's platform, holds the Mosaic custom call,
in the forward and, where the op is differentiated, again in the backward. The interpreted and the compiled
implementations are one function with one dispatch decision, so a case the function sends to XLA fails here.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gpu_common import RACE_REPORT


GPU_KERNEL_ENV = "QWENJAX_GPU_KERNEL_ENV"  # "1" on .ci/run's line for the GPU-kernel environment


def in_gpu_kernel_env() -> bool:
    """The GPU-kernel environment (`scripts/gpu_env.sh`), as .ci/run marks it: there the Mosaic GPU tests fail
    where they would skip elsewhere (no CUDA plugin, no interpreter)."""
    return os.environ.get(GPU_KERNEL_ENV) == "1"


def gpu_interpreter_required() -> bool:
    """Where the Mosaic GPU interpreter's absence fails the GPU tests: the GPU-kernel environment, and any
    jax >= 0.11, which has the interpreter (its absence there is a broken install, not an older JAX)."""
    return in_gpu_kernel_env() or jax.__version_info__ >= (0, 11)


class KernelCall(NamedTuple):
    """Where an interpreted kernel line is checked to reach its kernel."""
    compiled: str  # the dispatch-table name of the same function, compiled (not interpreted)
    platform: str  # the platform it is lowered for (no device needed)
    target: str    # the custom call of its kernels in the lowered program


MOSAIC_TPU = KernelCall("pallas_tpu", "tpu", "tpu_custom_call")
MOSAIC_GPU = KernelCall("pallas_gpu", "cuda", "mosaic_gpu_v2")
INTERPRETER_CALL = "xla_ffi_python_cpu_callback"  # how both interpreters run a kernel inside an XLA:CPU program


def custom_calls(text: str, target: str) -> int:
    """How many calls of custom call `target` a lowered (StableHLO) program's text makes."""
    return len(re.findall(rf"custom_call @{re.escape(target)}\b", text))


class KernelVsOracle:
    IMPLEMENTATIONS: tuple[str, ...] = ()
    CASES: dict[str, Any] = {}
    KERNELS: dict[str, KernelCall] = {"pallas_tpu_interpret": MOSAIC_TPU, "pallas_gpu_interpret": MOSAIC_GPU}
    BACKWARD = True
    EXACT_ZEROS = False

    @classmethod
    def covers(cls, implementation: str, case) -> bool:
        return True

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
        outputs_and_grads = self._program(self.run(implementation, case), case, kwargs)
        lowered = jax.jit(outputs_and_grads).lower(*args)
        (ours, our_grads), (want, want_grads) = lowered.compile()(*args)
        assert RACE_REPORT not in capfd.readouterr().out, f"{implementation}: a kernel raced (output above)"
        if implementation in self.KERNELS:
            self.assert_reaches_kernel(implementation, case, args, kwargs, lowered.as_text())
        else:
            assert "pallas" not in implementation, f"{implementation}: a kernel line with no KERNELS entry"
        forward_tol, backward_tol = self.tolerance(case, implementation)
        chex.assert_trees_all_equal_shapes_and_dtypes(ours, want)
        chex.assert_trees_all_equal_shapes_and_dtypes(our_grads, want_grads)
        outputs = list(zip(jax.tree.leaves(ours), jax.tree.leaves(want)))
        for i, (a, b) in enumerate(outputs):
            assert_matches(a, b, _nth(forward_tol, i, len(outputs)), f"{implementation}: output {i}",
                           self.EXACT_ZEROS)
        for i, (a, b) in enumerate(zip(our_grads, want_grads)):
            assert_matches(a, b, _nth(backward_tol, i, len(our_grads)), f"{implementation}: gradient of input {i}",
                           self.EXACT_ZEROS)

    def _program(self, fn: Callable, case, kwargs, oracle: bool = True, backward: bool | None = None) -> Callable:
        """args -> [(outputs, gradients)] of fn (and of the oracle), the gradients through a fixed cotangent."""
        fns = [fn, self.oracle(case)] if oracle else [fn]
        backward = self.BACKWARD if backward is None else backward

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

        return outputs_and_grads

    def assert_reaches_kernel(self, implementation: str, case, args, kwargs, program: str) -> None:
        """The line ran its kernel in the interpreter, and the same function compiled calls the Mosaic kernel."""
        call = self.KERNELS[implementation]
        assert INTERPRETER_CALL in program, f"{implementation}: the program calls no interpreted kernel"
        shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in args]
        compiled = self.run(call.compiled, case)

        def calls(backward: bool) -> int:
            program = jax.jit(self._program(compiled, case, kwargs, oracle=False, backward=backward))
            return custom_calls(program.trace(*shapes).lower(lowering_platforms=(call.platform,)).as_text(),
                                call.target)

        where = f"{call.compiled} lowered for {call.platform}"
        forward = calls(False)
        assert forward, f"{where}: no {call.target} in the forward"
        if self.BACKWARD:
            assert calls(True) > forward, f"{where}: no {call.target} in the backward (only the forward's {forward})"


def _nth(tol, i: int, count: int) -> float:
    if isinstance(tol, (int, float)):
        return tol
    assert len(tol) == count, f"{len(tol)} bounds for {count} values"
    return tol[i]


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
    else:  # no scale to be relative to: the bound is absolute (the battery's inputs and cotangents are O(1))
        err = np.max(np.abs(a), initial=0.0)
        assert err <= tol, f"{what}: max |actual| = {err:.3g} > {tol} where the oracle is all zeros"


def with_lasting_decays(model, seed: int = 0):
    """`model` with every linear-attention head's A = exp(A_log) drawn log-uniformly from [0.01, 1]: decays of
    about 0.27 to 0.99 a token, so that state lasts across chunks and every gate's gradient carries signal. (The
    initializer's [0.01, 16] leaves heads with A > 8 forgetting within a token, decay e^-10 or less: their gate
    gradients are rounding noise, 1e-8 where another layer's are 1e-5, on which two fp32 paths differ by 93%, and
    no relative bound can check them.) For the model-level tests of the gated delta rule's kernels."""
    rng = np.random.default_rng(seed)

    def decay(path, x):
        if "A_log" not in jax.tree_util.keystr(path):
            return x
        return jnp.asarray(rng.uniform(np.log(0.01), 0.0, x.shape), x.dtype)

    return model.replace(params=jax.tree_util.tree_map_with_path(decay, model.params))


def parametrize_battery(metafunc) -> None:
    """conftest's `pytest_generate_tests`: the (implementation, case) lines of a KernelVsOracle class, the cases an
    implementation `covers`; the Mosaic GPU lines are marked to run in the GPU-kernel environment."""
    cls = metafunc.cls
    if cls is None or not issubclass(cls, KernelVsOracle):
        return
    if {"implementation", "case_id"} <= set(metafunc.fixturenames):
        metafunc.parametrize("implementation, case_id", [
            pytest.param(name, case_id, id=f"{name}-{case_id}",
                         marks=[pytest.mark.gpu_kernels] if "gpu" in name else [])
            for name in cls.IMPLEMENTATIONS for case_id, case in cls.CASES.items() if cls.covers(name, case)])
