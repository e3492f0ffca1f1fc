"""How every hot op picks its implementation: an argument, else an environment variable, else "auto"."""

from __future__ import annotations

import os
from typing import Callable, Iterable


def resolve_choice(name: str | None, *, env: str, choices: Iterable[str], auto: Callable[[], str],
                   what: str) -> str:
    """`name` (default: $env, else "auto"), with "auto" replaced by `auto()`; anything else must be a choice."""
    name = name or os.environ.get(env) or "auto"
    if name == "auto":
        return auto()
    if name not in choices:
        raise ValueError(f"{what} {name!r} (argument or ${env}): choose one of {['auto', *choices]}")
    return name
