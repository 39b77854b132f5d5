"""Settings declared once: a config dataclass field carries its flag's help, env name and choices, and the
argparse flag, its env fallback, `--help` and the README's flag tables are generated from it.

    @dataclass(frozen=True)
    class Config:
        checkpoint: Path = field(metadata=setting("checkpoint directory", env="TWOTOWER_CHECKPOINT"))
        max_queue: int = field(default=1024, metadata=setting("users waiting for compute"))

    add_settings(parser, Config, env_prefix="PREFIX")  # --checkpoint, --max-queue (env PREFIX_MAX_QUEUE)
    args = parse_flags(parser, argv)  # usage error: "--checkpoint (or TWOTOWER_CHECKPOINT) is required"
    config = Config(**settings_from_args(Config, args))

The flag is `--` + the field name with `-` for `_`; the env name is `<PREFIX>_<FIELD>` unless `env=` names
another (`env=None`: no env fallback); a field without a default is a required flag. The annotation gives
the type: int, float, str, Path, `X | None` (an empty str/Path value = None), bool (a `--[no-]name` switch;
env 1/0, true/false, yes/no, on/off), `tuple[X, ...]` (one or more values; env whitespace-separated).
An env value goes through the flag's own conversion and choices (argparse applies `type` to string
defaults), so a bad one is the same usage error as a bad flag (exit 2), with the variable named.
Flags that belong to no dataclass (TLS) are declared as a `Flag` and added with `add_flag`: same help,
env and table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Literal

_METADATA_KEY = "twotower.setting"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class _AutoEnv:
    """`setting(env=...)` not given: the env name is `<PREFIX>_<FIELD>`."""

    def __repr__(self) -> str:
        return "AUTO_ENV"


AUTO_ENV: Any = _AutoEnv()


@dataclass(frozen=True)
class _Declared:
    help: str
    env: str | _AutoEnv | None
    choices: tuple[Any, ...] | None
    metavar: str | None


def setting(
    help: str,
    *,
    env: str | None = AUTO_ENV,
    choices: Sequence[Any] | None = None,
    metavar: str | None = None,
) -> dict[str, Any]:
    """Metadata of a dataclass field that is also a flag: `field(default=..., metadata=setting(help))`."""
    return {_METADATA_KEY: _Declared(help, env, tuple(choices) if choices is not None else None, metavar)}


@dataclass(frozen=True)
class Flag:
    """One command-line flag with its env fallback, as `--help` and the README tables show it."""

    option: str  # "--max-queue"; the argparse dest is "max_queue"
    help: str
    env: str | None = None  # env var read when the flag is not given; None = none
    default: Any = None  # the declared default (never the environment's value)
    required: bool = False  # given by the flag or its env var, non-empty
    kind: Literal["value", "switch", "list"] = "value"  # switch: --[no-]name; list: one or more values
    convert: Callable[[str], Any] = str  # applied to the flag's and the env var's text
    choices: tuple[Any, ...] | None = None
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.option.removeprefix("--").replace("-", "_")

    @property
    def usage(self) -> str:
        """`--name`, `--[no-]name`, `--name {a,b}` or `--name TARGET [TARGET ...]`."""
        name = self.option.removeprefix("--")
        if self.kind == "switch":
            return f"--[no-]{name}"
        if self.choices is not None:
            return f"{self.option} {{{','.join(map(str, self.choices))}}}"
        if self.kind == "list":
            metavar = self.metavar or self.dest.upper()
            return f"{self.option} {metavar} [{metavar} ...]"
        return self.option

    @property
    def shown_default(self) -> str:
        """The default as --help and the tables print it ("" when there is none to print)."""
        if self.required:
            return "required"
        if self.kind == "switch":
            return "on" if self.default else "off"
        if self.default is None or self.default == ():
            return ""
        return str(self.default)


# The Flag behind each action a parser got from add_flag: --help, parse_flags and the tables read it.
_FLAGS: weakref.WeakKeyDictionary[argparse.Action, Flag] = weakref.WeakKeyDictionary()


class _FromEnv(str):
    """An env var's text used as an argparse default, so a conversion error can name the variable."""

    env: str

    def __new__(cls, text: str, env: str) -> _FromEnv:
        value = super().__new__(cls, text)
        value.env = env
        return value


def _origin(text: str) -> str:
    return f" in env {text.env}" if isinstance(text, _FromEnv) else ""


def _bool(text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(
        f"invalid bool value: {text!r}{_origin(text)} (use {'/'.join(_TRUE)} or {'/'.join(_FALSE)})"
    )


def converter(
    base: Callable[[str], Any], choices: Sequence[Any] | None = None, empty_is_none: bool = False
) -> Callable[[str], Any]:
    """argparse `type`: `base` (int, float, str, Path), then `choices`; "" = None when `empty_is_none`.
    Errors read like argparse's own, plus the env var's name when the text came from one."""
    name = {int: "int", float: "float", str: "str", Path: "path"}.get(
        base, getattr(base, "__name__", "value")
    )

    def convert(text: str) -> Any:
        if empty_is_none and text == "":
            return None
        try:
            value = base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {name} value: {text!r}{_origin(text)}") from None
        if choices is not None and value not in choices:
            allowed = ", ".join(map(repr, choices))
            raise argparse.ArgumentTypeError(
                f"invalid choice: {text!r}{_origin(text)} (choose from {allowed})"
            )
        return value

    convert.__name__ = name
    return convert


class _Switch(argparse.Action):
    """`--name` / `--no-name` (argparse.BooleanOptionalAction, which takes no `type` for the env text)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        names = [name for option in option_strings for name in (option, f"--no-{option[2:]}")]
        super().__init__(names, dest, nargs=0, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, not str(option_string).startswith("--no-"))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def _split_env_list(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """For `nargs="+"`: an env var's text is whitespace-separated values; a flag's value is one of them."""

    def convert_list(text: str) -> Any:
        if isinstance(text, _FromEnv):
            return tuple(convert(_FromEnv(part, text.env)) for part in text.split())
        return convert(text)

    convert_list.__name__ = convert.__name__
    return convert_list


def _help_text(flag: Flag) -> str:
    shown = flag.shown_default
    notes = [shown if flag.required else f"default {shown}"] if shown else []
    notes.append(f"env {flag.env}" if flag.env else "no env var")
    if flag.env and flag.kind == "list":
        notes[-1] += ", whitespace-separated"
    text = f"{flag.help} ({'; '.join(notes)})" if flag.help else f"({'; '.join(notes)})"
    return text.replace("%", "%%")  # argparse %-formats help


def add_flag(container: argparse._ActionsContainer, flag: Flag) -> argparse.Action:
    """Add `flag` to a parser or argument group, its default read from its env var when that is set."""
    raw = os.environ.get(flag.env) if flag.env else None
    default = flag.default
    common: dict[str, Any] = {"dest": flag.dest, "help": _help_text(flag)}
    if flag.kind == "switch":
        if raw:  # "" = unset
            default = _FromEnv(raw, str(flag.env))
        action = container.add_argument(flag.option, action=_Switch, type=_bool, default=default, **common)
    else:
        if raw is not None:
            default = _FromEnv(raw, str(flag.env))
        convert = flag.convert if flag.kind == "value" else _split_env_list(flag.convert)
        action = container.add_argument(
            flag.option,
            type=convert,
            default=default,
            choices=flag.choices,
            metavar=flag.metavar,
            nargs="+" if flag.kind == "list" else None,
            **common,
        )
    _FLAGS[action] = flag
    return action


def flags_of(parser: argparse.ArgumentParser) -> list[Flag]:
    """The flags `add_flag` gave `parser`, in --help order."""
    return [_FLAGS[action] for action in parser._actions if action in _FLAGS]


def parse_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args`, then a usage error (exit 2) for a required flag given neither way."""
    args = parser.parse_args(argv)
    for flag in flags_of(parser):
        if flag.required and getattr(args, flag.dest) in (None, "", [], ()):
            either = f" (or {flag.env})" if flag.env else ""
            parser.error(f"{flag.option}{either} is required")
    return args


# -- dataclass fields -> flags -------------------------------------------------------------------------


def _shape(annotation: Any) -> tuple[Any, bool, Literal["value", "switch", "list"]]:
    """(base type, optional, kind) of a field's annotation."""
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"a setting is one type or None, not {annotation}")
        annotation, optional = args[0], True
    if annotation is bool:
        return bool, optional, "switch"
    if typing.get_origin(annotation) is tuple:
        item, *rest = typing.get_args(annotation)
        if rest != [Ellipsis]:
            raise TypeError(f"a list setting is tuple[X, ...], not {annotation}")
        return item, optional, "list"
    return annotation, optional, "value"


def dataclass_flags(cls: type, env_prefix: str, defaults: Mapping[str, Any] | None = None) -> list[Flag]:
    """The flags of `cls`'s `setting` fields; `defaults` overrides declared defaults (a service's port)."""
    hints = typing.get_type_hints(cls)
    flags = []
    for f in dataclasses.fields(cls):
        declared = f.metadata.get(_METADATA_KEY)
        if declared is None:
            continue
        default = (defaults or {}).get(f.name, f.default)
        required = default is MISSING
        base, optional, kind = _shape(hints[f.name])
        if base not in (int, float, str, Path, bool):
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported setting type {base}")
        env = f"{env_prefix}_{f.name.upper()}" if isinstance(declared.env, _AutoEnv) else declared.env
        empty_is_none = (optional or required) and base in (str, Path)
        flags.append(
            Flag(
                option="--" + f.name.replace("_", "-"),
                help=declared.help,
                env=env,
                default=None if required else default,
                required=required,
                kind=kind,
                convert=converter(base, declared.choices, empty_is_none) if kind != "switch" else _bool,
                choices=declared.choices,
                metavar=declared.metavar,
            )
        )
    return flags


def add_settings(
    container: argparse._ActionsContainer,
    cls: type,
    env_prefix: str,
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """Add a flag for each `setting` field of the dataclass `cls` (see `dataclass_flags`)."""
    for flag in dataclass_flags(cls, env_prefix, defaults):
        add_flag(container, flag)


def settings_from_args(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of `cls` for its `setting` fields, from parsed flags (lists become tuples)."""
    values = {}
    for f in dataclasses.fields(cls):
        if _METADATA_KEY in f.metadata:
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return values


# -- the README's tables ---------------------------------------------------------------------------------


def flag_table(parser: argparse.ArgumentParser) -> str:
    """Markdown: flag | env | default | help, one row per flag of `parser`, from the same declarations."""

    def cell(text: str, code: bool = False) -> str:
        if not text:
            return ""
        return f"`{text}`" if code else text.replace("|", "\\|")

    rows = ["| flag | env | default | help |", "|---|---|---|---|"]
    for flag in flags_of(parser):
        default = flag.shown_default
        shown = default if flag.required else cell(default, code=True)
        env = cell(flag.env or "", code=True)
        if flag.env and flag.kind == "list":
            env += " (whitespace-separated)"
        rows.append(f"| {cell(flag.usage, code=True)} | {env} | {shown} | {cell(flag.help)} |")
    return "\n".join(rows)
