"""A prefix cache for a hybrid model: what a cache row holds after a token prefix, so that a request starting with
that prefix prefills only the rest.

Attention layers could reuse any prefix of cached keys and values, but a Gated DeltaNet layer holds one recurrent
state and conv window after the whole prefix: it can resume only where a snapshot was taken. So the cache is a
tree of snapshots (`qwenjax.model.cache.RowSnapshot`) at chosen prefix lengths: each node holds the GDN state
after its prefix and the attention keys and values of the tokens since its parent. Restoring a node writes the
chain root → node into a row. Leaves are evicted, least recently used first, under a byte budget.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Sequence

from qwenjax.model.cache import RowSnapshot


@dataclasses.dataclass(eq=False)
class Node:
    tokens: tuple[int, ...]         # the prefix's tokens since the parent's
    parent: Node | None
    depth: int                      # the prefix's length
    snapshot: RowSnapshot | None    # None at the root (the empty prefix)
    children: dict[int, list[Node]] = dataclasses.field(default_factory=dict)  # by their first token
    last_used: int = 0

    @property
    def start(self) -> int:
        """Where this node's keys and values begin (its parent's depth)."""
        return self.depth - len(self.tokens)

    def chain(self) -> list[Node]:
        """The nodes root (excluded) → self, the order a restore writes them."""
        nodes, node = [], self
        while node.parent is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]


class PrefixCache:
    """Snapshots of cache rows keyed by token prefix, within `max_bytes` (0 turns the cache off)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.root = Node(tokens=(), parent=None, depth=0, snapshot=None)
        self.nbytes = 0
        self._clock = itertools.count(1)
        self.lookups = self.hits = self.hit_tokens = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return sum(1 for _ in self._nodes()) - 1

    def _nodes(self):
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            for siblings in node.children.values():
                stack.extend(siblings)

    def _deepest(self, tokens: Sequence[int], limit: int) -> Node:
        """The deepest node whose prefix starts `tokens` and is at most `limit` tokens long (the root at least)."""
        node = self.root
        while node.depth < limit:
            best = None
            for child in node.children.get(tokens[node.depth], ()):
                if child.depth <= limit and (best is None or child.depth > best.depth) and \
                        tuple(tokens[node.depth:child.depth]) == child.tokens:
                    best = child
            if best is None:
                break
            node = best
        return node

    def lookup(self, tokens: Sequence[int]) -> Node:
        """The longest cached prefix of `tokens` that leaves at least one token to prefill (its logits give the
        first new token); the root on a miss. Counts toward the hit rate."""
        node = self._deepest(tokens, len(tokens) - 1) if self.enabled and tokens else self.root
        self.lookups += 1
        if node is not self.root:
            self.hits += 1
            self.hit_tokens += node.depth
            self._touch(node)
        return node

    def _touch(self, node: Node) -> None:
        stamp = next(self._clock)
        while node is not None:
            node.last_used = stamp
            node = node.parent

    def insert(self, tokens: Sequence[int], take: Callable[[int, int], RowSnapshot]) -> None:
        """Caches the prefix `tokens` (all of them): `take(start, end)` snapshots the row that holds it, with the
        keys and values from `start`, where the deepest cached prefix of it ends."""
        if not self.enabled or not tokens:
            return
        parent = self._deepest(tokens, len(tokens))
        if parent.depth == len(tokens):
            self._touch(parent)
            return
        snapshot = take(parent.depth, len(tokens))
        if snapshot.nbytes > self.max_bytes:
            return
        node = Node(tokens=tuple(tokens[parent.depth:]), parent=parent, depth=len(tokens), snapshot=snapshot)
        parent.children.setdefault(node.tokens[0], []).append(node)
        self.nbytes += snapshot.nbytes
        self._touch(node)
        self._evict(keep=node)

    def _evict(self, keep: Node) -> None:
        """Drops least recently used leaves (never `keep`) until within the budget."""
        while self.nbytes > self.max_bytes:
            leaves = [n for n in self._nodes() if n.parent is not None and not n.children and n is not keep]
            if not leaves:
                return
            victim = min(leaves, key=lambda n: n.last_used)
            siblings = victim.parent.children[victim.tokens[0]]
            siblings.remove(victim)
            if not siblings:
                del victim.parent.children[victim.tokens[0]]
            self.nbytes -= victim.snapshot.nbytes


def chat_snapshot_points(tokenizer, messages: list[dict], prompt_ids: Sequence[int],
                         **template_kwargs) -> tuple[int, ...]:
    """Where the conversation so far ends in `prompt_ids` (its template rendering without the generation
    prompt), if the prompt starts with it: the next turn starts with that prefix, so a snapshot there lets it
    prefill only its new tokens. () if the template renders the history differently."""
    history = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=False,
                                                             **template_kwargs))
    return (len(history),) if history and list(prompt_ids[:len(history)]) == history else ()
