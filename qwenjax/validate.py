"""One validation layer for everything that enters from outside: JSON files, command-line flags, API arguments.

A value is checked against the type its field declares and is never coerced: "false" is not False, 1.7 is not 1,
"96" is not 96, NaN is not a number. Every error names where the value came from (the file and field, the flag,
the argument), so the user can fix it without reading a traceback.

    check(value, float, "generation_config.json field `temperature`")   # the value, or InputError
    check_fields(train_config, "TrainConfig")      # a dataclass's fields against their annotations
    read_json(path)                                # bytes → strict UTF-8 → JSON, errors naming the file
    flag(int, minimum=1)                           # an argparse `type=` that says which flag and why
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import types
import typing
from typing import Any, Literal, Union

MAX_JSON_BYTES = 64 * 1024 ** 2  # config, generation config, tokenizer config and index files are far smaller


class InputError(ValueError):
    """A value from outside (a file's field, a flag, an argument) of the wrong type or out of range."""


def describe(kind: Any) -> str:
    """`kind` (a type annotation) in words, for error messages."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is type(None) or kind is None:
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} " + " / ".join(_plural(a) for a in dict.fromkeys(args))
        return f"a list of {_plural(args[0]) if args else 'values'}"
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
            dict: "an object", Any: "any value"}.get(origin or kind, getattr(kind, "__name__", str(kind)))


def _plural(kind: Any) -> str:
    return {int: "integers", float: "finite numbers", bool: "booleans", str: "strings"}.get(kind, describe(kind))


def _shown(value: Any) -> str:
    text = repr(value)
    return (text if len(text) <= 80 else text[:77] + "...") + f" ({type(value).__name__})"


class _Mismatch(Exception):
    pass


def _check(value: Any, kind: Any) -> Any:
    """The value (lists as tuples where a tuple is declared, ints as floats where a float is) or _Mismatch."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if kind is type(None) or kind is None:
        if value is None:
            return value
        raise _Mismatch
    if origin in (Union, types.UnionType):
        for a in args:
            try:
                return _check(value, a)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _Mismatch
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _Mismatch
            return tuple(_check(v, a) for v, a in zip(value, args))
        items = [_check(v, args[0]) for v in value] if args else list(value)
        return tuple(items) if origin is tuple else items
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise _Mismatch
    if isinstance(value, origin or kind):
        return value
    raise _Mismatch


def check(value: Any, kind: Any, where: str, error: type[InputError] = InputError) -> Any:
    """`value` if it is of type `kind` (an annotation: int, float, bool, str, X | None, tuple[X, ...], Literal,
    ...), normalised (lists to tuples where a tuple is declared, ints to floats where a float is); else `error`
    naming `where`."""
    try:
        return _check(value, kind)
    except _Mismatch:
        raise error(f"{where}: must be {describe(kind)}, got {_shown(value)}") from None


def check_fields(obj: Any, where: str, error: type[InputError] = InputError, *,
                 field_name: typing.Callable[[str], str] = lambda name: f"`{name}`") -> None:
    """Checks every field of dataclass instance `obj` against its annotation (normalising it in place, frozen
    or not); an error names `where` and the field."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = check(getattr(obj, f.name), hints[f.name], f"{where} {field_name(f.name)}", error)
        object.__setattr__(obj, f.name, value)


def check_range(value: Any, where: str, *, minimum: float | None = None, maximum: float | None = None,
                above: float | None = None, below: float | None = None, error: type[InputError] = InputError):
    """`value` if within the bounds (`minimum`/`maximum` inclusive, `above`/`below` exclusive), else `error`."""
    bounds = ((minimum, ">=", lambda b: value >= b), (maximum, "<=", lambda b: value <= b),
              (above, ">", lambda b: value > b), (below, "<", lambda b: value < b))
    problems = [f"{op} {b}" for b, op, holds in bounds if b is not None and not holds(b)]
    if problems:
        raise error(f"{where}: must be {' and '.join(problems)}, got {value!r}")
    return value


def read_json(path: str | os.PathLike, error: type[InputError] = InputError) -> Any:
    """The parsed JSON file at `path`: read as bytes (at most MAX_JSON_BYTES), decoded as strict UTF-8; every
    failure is `error` naming the file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise error(f"{path}: is a directory, not a JSON file")
    with open(path, "rb") as f:
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise error(f"{path}: larger than {MAX_JSON_BYTES >> 20} MiB; not a JSON settings file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply") from None


def read_json_object(path: str | os.PathLike, error: type[InputError] = InputError) -> dict:
    obj = read_json(path, error)
    if not isinstance(obj, dict):
        raise error(f"{path}: must hold a JSON object, got {type(obj).__name__}")
    return obj


def flag(kind: type, *, minimum: float | None = None, maximum: float | None = None, above: float | None = None,
         below: float | None = None) -> typing.Callable[[str], Any]:
    """An argparse `type=` for an int or a finite float within bounds; argparse's error names the flag."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {describe(kind)}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {describe(kind)}")
        try:
            return check_range(value, repr(text), minimum=minimum, maximum=maximum, above=above, below=below)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = describe(kind)
    return parse


def text_arg(text: str, where: str) -> str:
    """`text` (a command-line argument) if it is valid UTF-8; Python hands undecodable bytes over as surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{where}: not UTF-8 text (byte 0x{ord(text[e.start]) & 0xFF:02x} at position {e.start})") \
            from None
    return text
