"""Each prompt token's log-probability under the model, for completions' `echo` with `logprobs` and vLLM's
`prompt_logprobs` (how evaluation harnesses score multiple-choice answers).

A forward pass over the whole prompt, never the prefix cache: a cached prefix holds the model's state after its
tokens, not what the model thought of each of them, so a prompt whose prefix is cached still gets every token's
log-probability. Right padding to a few compiled lengths cannot change them (the model is causal).
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.inference.sampling import token_logprobs
from qwenjax.ops.kernels import program_options
from qwenjax.pretrained import forward
from qwenjax.sharding import activation_sharding, param_shardings

MIN_LENGTH = 16
TOPS = (0, 1, 5, 20)  # compiled numbers of alternatives a request's count rounds up to


class PromptScorer:
    """`scorer(ids, top)`: for each token of `ids` after the first, (its log-probability given the tokens
    before it, its rank there (1: the most likely), [(id, log-probability)] of the `top` most likely tokens
    there). Thread-safe: one pass at a time."""

    def __init__(self, m):
        self.m = m
        self._lock = threading.Lock()

    def __call__(self, ids: list[int], top: int) -> list[tuple[float, int, list[tuple[int, float]]]]:
        n = len(ids)
        if n < 2:
            return []
        size = MIN_LENGTH
        while size < n:
            size *= 2
        compiled_top = next(k for k in TOPS if k >= top)
        padded, mask = np.zeros((1, size), np.int32), np.zeros((1, size), np.int32)
        padded[0, :n], mask[0, :n] = ids, 1
        with self._lock, activation_sharding(self.m.mesh, self.m.rules):
            out = self._fn(size, compiled_top)(self.m.params, padded, mask)
        chosen, rank, top_ids, top_lps = (np.asarray(x) for x in out)
        return [(float(chosen[i]), int(rank[i]), [(int(t), float(lp)) for t, lp in zip(top_ids[i, :top],
                                                                                        top_lps[i, :top])])
                for i in range(n - 1)]

    def _fn(self, size: int, top: int):
        def build():
            graphdef = self.m.graphdef

            def run(params, ids, mask):
                logits = forward(graphdef, params, ids, mask)[0, :-1].astype(jnp.float32)  # t predicts t + 1
                chosen, top_ids, top_lps = token_logprobs(logits, ids[0, 1:], top)
                picked = jnp.take_along_axis(logits, ids[0, 1:, None], axis=-1)
                return chosen, (logits > picked).sum(-1) + 1, top_ids, top_lps

            return jax.jit(run, in_shardings=(param_shardings(self.m.params, self.m.mesh, self.m.rules), None, None),
                           compiler_options=program_options(self.m))  # the same numbers whatever the padding

        return self.m.compiled(("prompt_logprobs", size, top), build)
