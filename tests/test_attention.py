"""The XLA attention op: causal block skipping equals the plain masked computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.ops.attention import dot_product_attention


@pytest.mark.parametrize("t", [256, 300, 2100])
def test_causal_blocks_equal_full_masked_attention(t):
    ks = jax.random.split(jax.random.key(t), 3)
    q = jax.random.normal(ks[0], (2, t, 4, 32))
    k = jax.random.normal(ks[1], (2, t, 2, 32))
    v = jax.random.normal(ks[2], (2, t, 2, 32))
    valid = jnp.arange(t)[None, :] < jnp.array([[t], [t - 37]])
    mask = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]
    full = dot_product_attention(q, k, v, mask, 0.2)
    blocked = dot_product_attention(q, k, v, mask, 0.2, causal=True)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(full), atol=1e-6, rtol=0)


def test_gqa_reads_kv_head_by_integer_division():
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (1, 5, 6, 8))
    k = jax.random.normal(ks[1], (1, 5, 2, 8))
    v = jax.random.normal(ks[2], (1, 5, 2, 8))
    out = dot_product_attention(q, k, v, None, 0.3)
    # explicit repeat_interleave: query head h uses kv head h // 3
    k_rep, v_rep = jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, k_rep) * 0.3
    ref = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), v_rep)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-6)
