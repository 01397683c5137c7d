"""Command-line interfaces over plain dataclass configs.

Every entry point has one config dataclass; its fields (``option(help, default, gt=..., renamed_from=...)``) are the
documentation of the options, their ranges (checked by ``Options.validate``) and their former names.
``parse_config(Cfg)`` builds the parser from the fields:

    int / float / str / Path   --batch-size 128
    bool                       --ema / --no-ema
    tuple[T, ...]              --widths 16 32 64        (tuple[T, T] takes exactly two values)
    Literal["a", "b"]          --norm a                 (choices)
    Optional[T] / T | None     --max-steps none         ("none" gives None)
    positional(...) tuple      RUN1 RUN2 ...            (words that are not options; at most one such field)

Values are resolved in order: dataclass defaults < recipe file (``--config FILE.json``, a JSON object
with field names as keys; keys starting with "_" are comments; a run directory's ``config.json`` works
too) < flags on the command line. The config's ``__post_init__``/``validate()`` may raise ValueError;
that, an unknown recipe key or a missing required option prints one line ``error: <message>`` on stderr
and exits with status 2 (argparse's own usage errors exit 2 as well). ``--dry-run`` prints the resolved
config as JSON and exits 0.

Why not tyro or simple-parsing: both map dataclasses to flags, but the contract here also needs recipes with "_"
comment keys and run directories' config.json as input, ``none`` for optional values, a renamed flag or key failing
with one line that names its successor, and every usage error as ONE ``error:`` line with exit status 2 (theirs
print multi-line, formatted help); wrapping them would be longer than this module.

``run_cli(main)`` wraps an entry point and maps what stops a run to one ``error:`` line on stderr and an exit
status a job scheduler can act on (set TRAINLIB_DEBUG=1 to see tracebacks always):

    2  bad input: an ``InputError``, raised only while an entry point validates its options and loads its inputs,
       before it writes anything (``checking_input()`` turns the ValueError / FileNotFoundError of that phase into
       one); argparse's own usage errors and invalid recipes too
    3  a non-finite loss or gradient stopped training (``RunFault`` from ``trainlib.nonfinite``); the newest
       checkpoint is the last good state: resume it (e.g. with a lower learning rate) or use ``--nonfinite skip``
    4  lost contact with another process: a collective (barrier, all-reduce, DDP's gradient sync) failed because a
       peer died, or timed out after the run's ``--collective-timeout`` because a peer hung; ``--resume latest``
       continues from the last checkpoint

Every other exception keeps its traceback and its own exit status: a ValueError raised in the middle of a run (after
files were written) is a failure, not bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar, Union

T = TypeVar("T")

INPUT_ERROR_EXIT_CODE = 2
NONFINITE_EXIT_CODE = 3
LOST_PROCESS_EXIT_CODE = 4
_RESERVED = ("config", "dry_run", "help")
_SCALARS = (int, float, str, bool, Path)


# -- field types ----------------------------------------------------------------------------------------
def _split_optional(tp: Any) -> tuple[Any, bool]:
    """(T, True) for Optional[T] / T | None, else (tp, False)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
        raise TypeError(f"unsupported union type {tp}; only Optional[T] is supported")
    return tp, False


def _tuple_items(tp: Any) -> tuple[Any, ...] | None:
    """Item types of tuple[T, ...] as (T, Ellipsis), of tuple[A, B] as (A, B); None if not a tuple."""
    if typing.get_origin(tp) is not tuple:
        return None
    items = typing.get_args(tp)
    if not items or any(t not in (*_SCALARS, Ellipsis) for t in items):
        raise TypeError(f"unsupported tuple type {tp}; use tuple[T, ...] or tuple[T, T] with T in int/float/str")
    return items


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _parse_scalar(tp: Any, text: str) -> Any:
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


def _coerce(tp: Any, value: Any) -> Any:
    """Check/convert a JSON value (from a recipe) to the field type tp; raises ValueError."""
    base, optional = _split_optional(tp)
    if value is None:
        if optional:
            return None
        raise ValueError("null is not allowed")
    items = _tuple_items(base)
    if items is not None:
        if not isinstance(value, list | tuple):
            raise ValueError(f"expected a list, got {value!r}")
        if items[-1] is not Ellipsis and len(value) != len(items):
            raise ValueError(f"expected {len(items)} values, got {len(value)}")
        item_types = [items[0]] * len(value) if items[-1] is Ellipsis else list(items)
        return tuple(_coerce(t, v) for t, v in zip(item_types, value, strict=True))
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
    raise ValueError(f"expected {_type_name(base)}, got {value!r}")


def _argument_kwargs(tp: Any) -> dict[str, Any]:
    """argparse keyword arguments (type / nargs / action / choices) for a field type."""
    base, optional = _split_optional(tp)
    items = _tuple_items(base)
    if base is bool and not optional:
        return {"action": argparse.BooleanOptionalAction}
    if items is not None:
        nargs = "*" if items[-1] is Ellipsis else len(items)
        return {"nargs": nargs, "metavar": _type_name(items[0]).upper()}

    def parse(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        return _parse_scalar(base, text)

    parse.__name__ = _type_name(base)  # argparse names the type in its error messages
    kwargs: dict[str, Any] = {"type": parse}
    if typing.get_origin(base) is Literal:
        kwargs["metavar"] = "{" + ",".join(map(str, typing.get_args(base))) + "}"
    return kwargs


def _from_command_line(tp: Any, value: Any) -> Any:
    """Finish converting an argparse value (tuples arrive as lists of words)."""
    base, optional = _split_optional(tp)
    items = _tuple_items(base)
    if items is None:
        return value
    if optional and len(value) == 1 and value[0].lower() == "none":
        return None
    item_types = [items[0]] * len(value) if items[-1] is Ellipsis else list(items)
    return tuple(_parse_scalar(t, word) for t, word in zip(item_types, value, strict=True))


def _fields(cls: type) -> tuple[list[dataclasses.Field], dict[str, Any]]:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    fields = [f for f in dataclasses.fields(cls) if f.init]
    for f in fields:
        if f.name in _RESERVED:
            raise TypeError(f"config field name {f.name!r} is reserved for the command line")
    return fields, typing.get_type_hints(cls)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


# -- fields ----------------------------------------------------------------------------------------------
_BOUNDS = {"gt": (">", lambda v, b: v > b), "ge": (">=", lambda v, b: v >= b), "lt": ("<", lambda v, b: v < b),
           "le": ("<=", lambda v, b: v <= b)}


def option(help: str, default, *, gt=None, ge=None, lt=None, le=None, renamed_from: str | None = None):
    """A config field with its help text and, declaratively, its range (``gt`` / ``ge`` / ``lt`` / ``le``; None
    passes) and the name it had before (``renamed_from``: the old flag and recipe key fail with a line naming this
    one): ``lr: float = option("peak learning rate", 0.2, gt=0)``."""
    bounds = {key: value for key, value in dict(gt=gt, ge=ge, lt=lt, le=le).items() if value is not None}
    return dataclasses.field(default=default, metadata={"help": help, "bounds": bounds, "renamed_from": renamed_from})


def check_bounds(config: Any) -> None:
    """ValueError naming the first field of ``config`` outside the range its ``option`` declares."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None:
            continue
        for key, bound in f.metadata.get("bounds", {}).items():
            symbol, holds = _BOUNDS[key]
            if not holds(value, bound):
                raise ValueError(f"{f.name} must be {symbol} {bound}, got {value}")


class Options:
    """Base of the config dataclasses: ``validate()`` checks the declared ranges; subclasses add their own checks
    (call ``super().validate()``)."""

    def validate(self) -> None:
        check_bounds(self)


def _renamed(cls: type) -> dict[str, str]:
    """{old name: new name} of the fields of ``cls`` declared with ``renamed_from``."""
    fields, _ = _fields(cls)
    return {f.metadata["renamed_from"]: f.name for f in fields if f.metadata.get("renamed_from")}


# -- parsing ----------------------------------------------------------------------------------------------


def positional(help: str, default: tuple = ()):
    """A tuple field filled from the words that are not options: ``runs: tuple[str, ...] = positional("...")``."""
    return dataclasses.field(default=default, metadata={"help": help, "positional": True})


def fail(message: str) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit with status 2 (bad input)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(INPUT_ERROR_EXIT_CODE)


class OneLineErrorParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line, ``error: <message> (see --help)``, exit status 2."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")


def build_parser(cls: type, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one option per dataclass field plus --config and --dry-run."""
    fields, hints = _fields(cls)
    parser = OneLineErrorParser(prog=prog, description=description or (cls.__doc__ or "").strip() or None)
    parser.add_argument("--config", metavar="FILE.json", help="recipe file (JSON object of options); flags override it")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config as JSON and exit")
    if sum(bool(f.metadata.get("positional")) for f in fields) > 1:
        raise TypeError(f"{cls.__name__} has more than one positional field")
    for f in fields:
        default = _default(f)
        shown = "required" if default is dataclasses.MISSING else f"default: {json.dumps(_to_jsonable(default))}"
        help_text = f"{f.metadata.get('help', '')} ({shown})".strip().replace("%", "%%")
        if f.metadata.get("positional"):
            items = _tuple_items(hints[f.name])
            if items is None or items[-1] is not Ellipsis:
                raise TypeError(f"positional field {f.name!r} must be a tuple[T, ...]")
            parser.add_argument(f.name, nargs="*", default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)
            continue
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=argparse.SUPPRESS,
            help=help_text,
            **_argument_kwargs(hints[f.name]),
        )
    for old, new in _renamed(cls).items():
        parser.add_argument("--" + old.replace("_", "-"), nargs="*", help=argparse.SUPPRESS, default=argparse.SUPPRESS,
                            action=_renamed_action(old, new))
    return parser


def _renamed_action(old: str, new: str) -> type[argparse.Action]:
    class Renamed(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            fail(f"--{old.replace('_', '-')} was renamed --{new.replace('_', '-')}")

    return Renamed


def load_recipe(cls: type, path: str | os.PathLike) -> dict[str, Any]:
    """Read a recipe file into checked field values; raises ValueError/FileNotFoundError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"recipe {path} is not valid JSON: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict) and isinstance(data.get("run"), dict):
        data = data["config"]  # a run directory's config.json
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must hold a JSON object of options, got {type(data).__name__}")
    fields, hints = _fields(cls)
    names, renamed = [f.name for f in fields], _renamed(cls)
    values = {}
    for key, value in data.items():
        if key.startswith("_"):
            continue
        if key in renamed and key not in names:
            raise ValueError(f"key {key!r} in recipe {path} was renamed {renamed[key]!r}")
        if key not in names:
            raise ValueError(f"unknown key {key!r} in recipe {path} (valid keys: {', '.join(names)})")
        try:
            values[key] = _coerce(hints[key], value)
        except ValueError as e:
            raise ValueError(f"recipe {path}: key {key!r}: {e}") from None
    return values


def parse_config(
    cls: type[T], argv: list[str] | None = None, prog: str | None = None, description: str | None = None
) -> T:
    """Build ``cls`` from defaults, an optional ``--config`` recipe and command-line flags (see module doc)."""
    parser = build_parser(cls, prog, description)
    args = vars(parser.parse_args(argv))
    config_path, dry_run = args.pop("config"), args.pop("dry_run")
    fields, hints = _fields(cls)
    try:
        values = load_recipe(cls, config_path) if config_path else {}
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    try:
        values.update({name: _from_command_line(hints[name], value) for name, value in args.items()})
    except ValueError as e:
        fail(str(e))
    missing = [f.name for f in fields if f.name not in values and _default(f) is dataclasses.MISSING]
    if missing:
        fail("missing required option(s): " + ", ".join("--" + name.replace("_", "-") for name in missing))
    try:
        config = cls(**values)
        validate = getattr(config, "validate", None)
        if callable(validate):
            validate()
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    if dry_run:
        print(json.dumps(config_to_dict(config), indent=2))
        sys.exit(0)
    return config


# -- saving -------------------------------------------------------------------------------------------------
def _to_jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of the config's init fields (tuples become lists, paths strings): a valid recipe."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"expected a dataclass instance, got {config!r}")
    return _to_jsonable({f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init})


def config_hash(config: Any) -> str:
    """First 16 hex digits of the sha256 of the config's canonical JSON (key order independent)."""
    from .files import sha256_json

    return sha256_json(config_to_dict(config))


def save_config(config: Any, path: str | os.PathLike) -> None:
    """Write the config as a recipe file (atomically) that ``--config`` reads back."""
    from .files import atomic_write_json

    atomic_write_json(path, config_to_dict(config))


# -- entry points ---------------------------------------------------------------------------------------
class InputError(ValueError):
    """Bad input (an invalid option, a missing or unusable file, data that do not fit), found before anything was
    written: ``run_cli`` prints its message as one line and exits with status 2."""


@contextlib.contextmanager
def checking_input() -> Iterator[None]:
    """The input-checking phase of an entry point (validate options, load data and models, everything before the
    first write): a ValueError or FileNotFoundError raised inside is bad input and leaves as an ``InputError``
    (the original chained). Keep writes out of this block."""
    try:
        yield
    except InputError:
        raise
    except (ValueError, FileNotFoundError) as error:
        raise InputError(str(error)) from error


class RunFault(RuntimeError):
    """A fault a run detected and stopped on, not bad input: ``run_cli`` prints one line and exits ``exit_code``."""

    exit_code = NONFINITE_EXIT_CODE


def _collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a failed or timed-out collective of an initialised process group: torch's
    ``DistError`` family, or a RuntimeError from the gloo / NCCL transport (a lost connection, a timeout). Usage
    errors raised by DDP itself (e.g. unused parameters) are bugs and keep their traceback."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return False
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    return isinstance(error, RuntimeError) and any(word in str(error) for word in ("gloo", "NCCL"))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _close_progress_bars() -> None:
    """End open tqdm bars with their newline, so an error printed next starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def _exit_with(message: str, code: int) -> NoReturn:
    _close_progress_bars()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    prefix = f"[rank {os.environ.get('RANK', '0')}] " if world_size > 1 else ""
    print(f"{prefix}error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def run_cli(main: Callable[[], T]) -> T:
    """Run an entry point; what stops it becomes one ``error:`` line and the exit status of the module docstring.

    Bad input is an ``InputError`` (``checking_input``); every other exception propagates with its traceback.
    """
    debug = bool(os.environ.get("TRAINLIB_DEBUG"))
    try:
        return main()
    except InputError as e:
        if debug:
            raise
        _exit_with(str(e), INPUT_ERROR_EXIT_CODE)
    except RunFault as e:
        if debug:
            raise
        _exit_with(str(e), e.exit_code)
    except RuntimeError as e:
        if debug or not _collective_failure(e):
            raise
        _exit_with(f"lost contact with another process: a collective operation failed ({_first_line(e)}); a process "
                   "died or hung (the wait is bounded by --collective-timeout); continue with --resume latest",
                   LOST_PROCESS_EXIT_CODE)
