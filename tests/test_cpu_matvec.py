"""The CPU matmul kernel (pallas_kernels/matmul/cpu_matvec.cc, bf16 and fp32) against float64, XLA and its exact
arithmetic (`matmul_canonical`), beyond the battery of tests/test_kernels.py: where it is dispatched to, its build,
and a bf16 decode. Its batch invariance through the model: tests/test_batch_invariance.py."""

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwenjax
from pallas_kernels.matmul import cpu as cpu_matvec
from pallas_kernels.matmul.reference import matmul_canonical
from pallas_kernels.matmul.xla import matmul_xla
from qwenjax.ops.matmul import matmul_wt

# Only a machine with no C++ compiler skips: where one exists, a kernel that fails to build fails the suite
# (test_builds_where_a_compiler_exists, and every test below that calls it).
pytestmark = pytest.mark.skipif(cpu_matvec.compiler() is None,
                                reason="no C++ compiler ($CXX, g++, c++, clang++): the XLA path is used")


BF16 = cpu_matvec.TARGETS[jnp.dtype(jnp.bfloat16)][0]
F32 = cpu_matvec.TARGETS[jnp.dtype(jnp.float32)][0]
kernel_matmul = functools.partial(matmul_wt, implementation="kernel")


def _inputs(rows, out_features, in_features, seed=0, dtype=jnp.bfloat16):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (rows, in_features), dtype)
    w = jax.random.normal(kw, (out_features, in_features), dtype)
    return x, w


def test_builds_where_a_compiler_exists():
    cpu_matvec.require()  # raises with the compiler's error


# In-features cover the kernel's blocks (32 bf16 / 16 fp32 elements), a partial last block and an odd length;
# out-features tiles of 4 weight rows and a partial one, tasks shared between threads and a last partial task;
# rows tiles of 4 x rows, a partial one, and tasks of 64 rows.
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16, 67])
@pytest.mark.parametrize("out_features,in_features", [(37, 1001), (64, 1024), (300, 2050), (2051, 16)])
def test_matches_float64(rows, out_features, in_features, dtype):
    x, w = _inputs(rows, out_features, in_features, dtype=dtype)
    y = np.asarray(jax.jit(cpu_matvec.matmul_kernel)(x, w))
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    ref = x64 @ w64.T
    # fp32 accumulation: the error of any summation order is bounded by n * eps * sum |x_i w_i|.
    bound = in_features * np.finfo(np.float32).eps * (np.abs(x64) @ np.abs(w64).T)
    assert y.dtype == np.float32 and y.shape == (rows, out_features)
    assert np.all(np.abs(y - ref) <= bound)
    xla = np.asarray(jax.jit(matmul_xla)(x, w))
    assert np.abs(y - ref).max() <= 2 * np.abs(xla - ref).max() + 1e-6 * np.abs(ref).max()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("rows,out_features,in_features", [(1, 5, 7), (3, 9, 33), (5, 37, 1001), (17, 70, 64),
                                                            (70, 13, 100), (4, 6, 1)])
def test_bits_are_the_canonical_order(rows, out_features, in_features, dtype):
    """Every output is the header's sequence of fp32 operations, bit for bit, computed independently in numpy (the
    same on every CPU: VDPBF16PS where there is AVX512-BF16, FMAs on AVX2, AVX-512F or none)."""
    x, w = _inputs(rows, out_features, in_features, seed=rows, dtype=dtype)
    np.testing.assert_array_equal(np.asarray(jax.jit(cpu_matvec.matmul_kernel)(x, w)), matmul_canonical(x, w))


def test_leading_dimensions_and_matmul_wt_dispatch():
    x, w = _inputs(1, 96, 80)
    x3 = x.reshape(1, 1, 80)
    hlo = jax.jit(kernel_matmul).lower(x3, w).as_text()
    assert BF16 in hlo
    np.testing.assert_array_equal(np.asarray(kernel_matmul(x3, w)).reshape(1, 96),
                                  np.asarray(cpu_matvec.matmul_kernel(x, w)))
    assert BF16 not in jax.jit(functools.partial(matmul_wt, implementation="xla")).lower(x3, w).as_text()
    x5, _ = _inputs(40, 96, 80)
    assert BF16 in jax.jit(kernel_matmul).lower(x5.reshape(2, 20, 80), w).as_text()  # any number of rows
    x2, w32 = _inputs(2, 96, 80, dtype=jnp.float32)
    assert F32 in jax.jit(kernel_matmul).lower(x2, w32).as_text()
    assert F32 in jax.jit(kernel_matmul).lower(x2[:1], w32).as_text()  # one fp32 row too: one summation order
    assert BF16 not in jax.jit(kernel_matmul).lower(x2.astype(jnp.bfloat16), w32).as_text()  # mixed: XLA
    assert F32 not in jax.jit(kernel_matmul).lower(x2[:0], w32).as_text()  # no rows: XLA's empty product
    assert kernel_matmul(x2[:0], w32).shape == (0, 96)


def test_gradient_is_the_xla_gradient():
    x, w = _inputs(2, 48, 72, seed=1)
    c = jax.random.normal(jax.random.key(2), (2, 48), jnp.float32)
    loss = lambda f: lambda x, w: jnp.sum(f(x, w) * c)
    got = jax.jit(jax.grad(loss(cpu_matvec.matmul_kernel), argnums=(0, 1)))(x, w)
    want = jax.jit(jax.grad(loss(matmul_xla), argnums=(0, 1)))(x, w)
    for g, r in zip(got, want):
        assert g.dtype == r.dtype
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(r, np.float32))


def test_training_forward_of_many_rows_is_xla_dot():
    """Under a gradient, products of more than 4 rows run XLA's dot (training needs no batch invariance; XLA's GEMM
    is faster there): the loss and gradients are those of the XLA path, bit for bit; few rows keep the kernel."""
    x, w = _inputs(64, 48, 72, seed=3)
    c = jax.random.normal(jax.random.key(4), (64, 48), jnp.float32)
    loss = lambda f: lambda x, w: jnp.sum(f(x, w) * c[:len(x)])
    grad = lambda f: jax.jit(jax.value_and_grad(loss(f), argnums=(0, 1)))
    assert BF16 not in grad(kernel_matmul).lower(x, w).as_text()
    assert BF16 in grad(kernel_matmul).lower(x[:3], w).as_text()
    assert BF16 in jax.jit(kernel_matmul).lower(x, w).as_text()  # inference: the kernel, any rows
    (got, got_grads), (want, want_grads) = grad(kernel_matmul)(x, w), grad(matmul_xla)(x, w)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for g, r in zip(got_grads, want_grads):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(r, np.float32))


def test_chosen_by_the_kernels_setting_else_the_environment(monkeypatch):
    assert qwenjax.Kernels().resolve("cpu").cpu_matvec == "kernel"
    assert qwenjax.Kernels().resolve("tpu").cpu_matvec == "xla"
    monkeypatch.setenv("QWENJAX_CPU_MATVEC", "xla")  # the environment-variable fallback
    assert qwenjax.Kernels().resolve("cpu").cpu_matvec == "xla"
    assert qwenjax.Kernels(cpu_matvec="kernel").resolve("cpu").cpu_matvec == "kernel"  # the argument wins
    with pytest.raises(ValueError, match="runs on the CPU"):
        qwenjax.Kernels(cpu_matvec="kernel").resolve("gpu")


def test_failed_build_falls_back_and_leaves_no_file(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("QWENJAX_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_matvec, "compiler", lambda: "/bin/false")  # a "compiler" that always fails
    with caplog.at_level(logging.WARNING, logger=cpu_matvec.__name__):
        why = cpu_matvec._build_and_register.__wrapped__()
    assert "/bin/false" in why and "unavailable" in caplog.text and "/bin/false" in caplog.text
    assert os.listdir(tmp_path) == []


def test_bf16_decode_is_as_close_to_fp32_as_the_xla_path(tmp_path):
    """A bf16 prefill + decode steps with the kernel, and with XLA's dot, each against the same model in fp32."""
    pytest.importorskip("torch")
    from qwenjax.model.cache import init_cache
    from qwenjax.testing import make_hf_checkpoint

    make_hf_checkpoint(tmp_path, seed=3)
    ids = np.random.default_rng(0).integers(0, 256, (2, 28))

    def decode_logits(dtype, cpu_matvec="kernel"):
        mod = qwenjax.from_pretrained(tmp_path, dtype=dtype, kernels={"cpu_matvec": cpu_matvec}).module
        cache = init_cache(mod.config, 2, 64, jnp.dtype(dtype))
        logits, cache = jax.jit(lambda i, c: mod.extend(i, c, fresh=True))(jnp.asarray(ids[:, :20]), cache)
        out = [logits]
        step = jax.jit(lambda i, c: mod.extend(i, c))
        used.append(BF16 in step.lower(jnp.asarray(ids[:, :1]), cache).as_text())
        for s in range(20, 28):  # 2 rows per step: the kernel's case
            logits, cache = step(jnp.asarray(ids[:, s:s + 1]), cache)
            out.append(logits)
        return np.stack([np.asarray(x, np.float32) for x in out])

    used = []
    ref = decode_logits("float32")
    kernel = decode_logits("bfloat16")
    xla = decode_logits("bfloat16", cpu_matvec="xla")
    assert used == [False, True, False]
    err_kernel, err_xla = np.abs(kernel - ref), np.abs(xla - ref)
    assert err_kernel.max() <= 1.25 * err_xla.max() and err_kernel.mean() <= 1.25 * err_xla.mean()
