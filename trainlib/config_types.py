"""Field types of config dataclasses on the command line and in recipes: how a type becomes argparse arguments, how
command-line words and JSON values are checked and converted, and how values go back to JSON.

    int / float / str / Path   one word                       bool            --flag / --no-flag
    tuple[T, ...]              any number of words            tuple[T, T]     exactly two words
    Literal["a", "b"]          one of the choices             T | None        also the word "none" / JSON null
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

SCALARS = (int, float, str, bool, Path)


def split_optional(tp: Any) -> tuple[Any, bool]:
    """(T, True) for Optional[T] / T | None, else (tp, False)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
        raise TypeError(f"unsupported union type {tp}; only Optional[T] is supported")
    return tp, False


def tuple_items(tp: Any) -> tuple[Any, ...] | None:
    """Item types of tuple[T, ...] as (T, Ellipsis), of tuple[A, B] as (A, B); None if not a tuple."""
    if typing.get_origin(tp) is not tuple:
        return None
    items = typing.get_args(tp)
    if not items or any(t not in (*SCALARS, Ellipsis) for t in items):
        raise TypeError(f"unsupported tuple type {tp}; use tuple[T, ...] or tuple[T, T] with T in int/float/str")
    return items


def type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def parse_scalar(tp: Any, text: str) -> Any:
    """Parse one command-line word as a scalar of type tp (raises ValueError)."""
    if tp is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if str(choice) == text:
                return choice
        raise ValueError(f"expected one of {list(choices)}, got {text!r}")
    return tp(text)


def coerce(tp: Any, value: Any) -> Any:
    """Check/convert a JSON value (from a recipe) to the field type tp; raises ValueError."""
    base, optional = split_optional(tp)
    if value is None:
        if optional:
            return None
        raise ValueError("null is not allowed")
    items = tuple_items(base)
    if items is not None:
        if not isinstance(value, list | tuple):
            raise ValueError(f"expected a list, got {value!r}")
        if items[-1] is not Ellipsis and len(value) != len(items):
            raise ValueError(f"expected {len(items)} values, got {len(value)}")
        item_types = [items[0]] * len(value) if items[-1] is Ellipsis else list(items)
        return tuple(coerce(t, v) for t, v in zip(item_types, value, strict=True))
    if typing.get_origin(base) is Literal:
        if value not in typing.get_args(base):
            raise ValueError(f"expected one of {list(typing.get_args(base))}, got {value!r}")
        return value
    if base is bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if base in (str, Path) and isinstance(value, str):
        return base(value)
    raise ValueError(f"expected {type_name(base)}, got {value!r}")


def argument_kwargs(tp: Any) -> dict[str, Any]:
    """argparse keyword arguments (type / nargs / action / choices) for a field type."""
    base, optional = split_optional(tp)
    items = tuple_items(base)
    if base is bool and not optional:
        return {"action": argparse.BooleanOptionalAction}
    if items is not None:
        nargs = "*" if items[-1] is Ellipsis else len(items)
        return {"nargs": nargs, "metavar": type_name(items[0]).upper()}

    def parse(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        return parse_scalar(base, text)

    parse.__name__ = type_name(base)  # argparse names the type in its error messages
    kwargs: dict[str, Any] = {"type": parse}
    if typing.get_origin(base) is Literal:
        kwargs["metavar"] = "{" + ",".join(map(str, typing.get_args(base))) + "}"
    return kwargs


def from_command_line(tp: Any, value: Any) -> Any:
    """Finish converting an argparse value (tuples arrive as lists of words)."""
    base, optional = split_optional(tp)
    items = tuple_items(base)
    if items is None:
        return value
    if optional and len(value) == 1 and value[0].lower() == "none":
        return None
    item_types = [items[0]] * len(value) if items[-1] is Ellipsis else list(items)
    return tuple(parse_scalar(t, word) for t, word in zip(item_types, value, strict=True))


def to_jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value
