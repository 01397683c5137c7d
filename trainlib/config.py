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
too) < flags on the command line. A recipe may name another with ``"extends": "base.json"`` (a path relative to
its own folder): it then holds only what differs, over the base's values (bases may extend further; a cycle is an
error); ``--dry-run`` shows the result. The config's ``__post_init__``/``validate()`` may raise ValueError;
that, an unknown recipe key or a missing required option prints one line ``error: <message>`` on stderr
and exits with status 2 (argparse's own usage errors exit 2 as well). ``--dry-run`` prints the resolved
config as JSON and exits 0.

Why not tyro or simple-parsing: both map dataclasses to flags, but the contract here also needs recipes with "_"
comment keys and run directories' config.json as input, ``none`` for optional values, a renamed flag or key failing
with one line that names its successor, and every usage error as ONE ``error:`` line with exit status 2 (theirs
print multi-line, formatted help); wrapping them would be longer than this module.

Entry points run under ``trainlib.cli.run_cli``: every usage error above is one ``error:`` line, exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from .cli import fail
from .config_types import argument_kwargs, coerce, from_command_line, to_jsonable, tuple_items

T = TypeVar("T")

EXTENDS = "extends"  # the recipe key naming a base recipe
_RESERVED = ("config", "dry_run", "help", EXTENDS)


# -- fields ---------------------------------------------------------------------------------------------------
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


_BOUNDS = {"gt": (">", lambda v, b: v > b), "ge": (">=", lambda v, b: v >= b), "lt": ("<", lambda v, b: v < b),
           "le": ("<=", lambda v, b: v <= b)}


def option(help: str, default, *, gt=None, ge=None, lt=None, le=None, renamed_from: str | None = None):
    """A config field with its help text and, declaratively, its range (``gt`` / ``ge`` / ``lt`` / ``le``; None
    passes) and the name it had before (``renamed_from``: the old flag and recipe key fail with a line naming this
    one): ``lr: float = option("peak learning rate", 0.2, gt=0)``."""
    bounds = {key: value for key, value in dict(gt=gt, ge=ge, lt=lt, le=le).items() if value is not None}
    return dataclasses.field(default=default, metadata={"help": help, "bounds": bounds, "renamed_from": renamed_from})


def positional(help: str, default: tuple = ()):
    """A tuple field filled from the words that are not options: ``runs: tuple[str, ...] = positional("...")``."""
    return dataclasses.field(default=default, metadata={"help": help, "positional": True})


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
        shown = "required" if default is dataclasses.MISSING else f"default: {json.dumps(to_jsonable(default))}"
        help_text = f"{f.metadata.get('help', '')} ({shown})".strip().replace("%", "%%")
        if f.metadata.get("positional"):
            items = tuple_items(hints[f.name])
            if items is None or items[-1] is not Ellipsis:
                raise TypeError(f"positional field {f.name!r} must be a tuple[T, ...]")
            parser.add_argument(f.name, nargs="*", default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)
            continue
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=argparse.SUPPRESS,
            help=help_text,
            **argument_kwargs(hints[f.name]),
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


def recipe_chain(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """[(file, its own option values)] from the root base to ``path``, following ``extends`` (module docstring): the
    values as written (JSON types), "_" comments and ``extends`` dropped; raises ValueError/FileNotFoundError naming
    the problem (a missing file, bad JSON, a cycle)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe file not found: {path}" + (f" (extended by {_chain[-1]})" if _chain else ""))
    if path.resolve() in (p.resolve() for p in _chain):
        raise ValueError("recipes extend each other in a cycle: " + " -> ".join(map(str, (*_chain, path))))
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"recipe {path} is not valid JSON: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict) and isinstance(data.get("run"), dict):
        data = data["config"]  # a run directory's config.json
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must hold a JSON object of options, got {type(data).__name__}")
    values = {key: value for key, value in data.items() if not key.startswith("_")}
    base = values.pop(EXTENDS, None)
    if base is None:
        return [(path, values)]
    if not isinstance(base, str) or not base:
        raise ValueError(f"recipe {path}: {EXTENDS!r} must name a recipe file, got {base!r}")
    return [*recipe_chain(path.parent / base, (*_chain, path)), (path, values)]


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """A recipe's option values as written, each file of its ``recipe_chain`` over the ones it extends."""
    merged = {}
    for _, values in recipe_chain(path):
        merged |= values
    return merged


def load_recipe(cls: type, path: str | os.PathLike) -> dict[str, Any]:
    """Read a recipe file (``recipe_chain``) into checked field values; raises ValueError/FileNotFoundError naming the
    problem and the file of the chain that holds it."""
    data, source = {}, {}  # the merged values, and the file whose value of each key wins
    for file, own in recipe_chain(path):
        data |= own
        source |= dict.fromkeys(own, file)
    fields, hints = _fields(cls)
    names, renamed = [f.name for f in fields], _renamed(cls)
    values = {}
    for key, value in data.items():
        if key in renamed and key not in names:
            raise ValueError(f"key {key!r} in recipe {source[key]} was renamed {renamed[key]!r}")
        if key not in names:
            raise ValueError(f"unknown key {key!r} in recipe {source[key]} (valid keys: {', '.join(names)})")
        try:
            values[key] = coerce(hints[key], value)
        except ValueError as e:
            raise ValueError(f"recipe {source[key]}: key {key!r}: {e}") from None
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
        values.update({name: from_command_line(hints[name], value) for name, value in args.items()})
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
def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of the config's init fields (tuples become lists, paths strings): a valid recipe."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"expected a dataclass instance, got {config!r}")
    return to_jsonable({f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init})


def config_hash(config: Any) -> str:
    """First 16 hex digits of the sha256 of the config's canonical JSON (key order independent)."""
    from .files import sha256_json

    return sha256_json(config_to_dict(config))


def save_config(config: Any, path: str | os.PathLike) -> None:
    """Write the config as a recipe file (atomically) that ``--config`` reads back."""
    from .files import atomic_write_json

    atomic_write_json(path, config_to_dict(config))
