"""Typed option fields: one home for how a recipe value or a flag is written, parsed, documented and checked.

Dataclass fields declared with :func:`option` carry their help, unit and flag in metadata. :func:`coerce` turns what
a user wrote (YAML scalar, string from a flag) into the field's precise type (``int``, ``float``, ``bool``,
``Literal[...]``, ``tuple[int, int]``, ``list[str]``, ``X | None``) or raises ``ValueError`` with a short reason;
:func:`coerce_fields` applies it to every field of a dataclass and names the key in a :class:`CavError`.
:func:`add_flags` builds argparse flags from the same fields, with defaults and units in their help: flags that
override a recipe (default None, parsed by the dataclass), or with ``defaults=True`` a command's own flags (the
fields' defaults, parsed as argparse reads them, read back as the dataclass with :func:`from_args`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from dataclasses import field
from typing import Any, Literal

from .errors import CavError

_MISSING = dataclasses.MISSING


REQUIRED = _MISSING  # ``option(REQUIRED, ...)``: no default; the flag must be given (a positional: at least one value)


def option(default, help, *, unit: str = "", flag: str = "", metavar=None, repeat: bool = False,
           default_text="", parse=None, key: str = "", check=None, positional: bool = False):
    """A dataclass field with CLI metadata.

    ``unit``: shown after the default in --help. ``flag``: the flag name if not ``--field-name``. ``repeat``: a
    ``tuple[X, X]`` also accepts one value for both (``size: 256``). ``default_text``: what --help says the default
    is when the plain value would mislead (e.g. "the adapter's"). ``parse``: a function that replaces the type's
    parser for a value with a rule of its own (adapter weights), raising CavError with its own message. ``key``: the
    option's flat key (flags' dest, batch manifest columns, recipes of format 1) if not the flag's name with ``_``.
    ``check``: a function of the parsed value that raises ``ValueError`` with the reason when the value is out of
    range (:func:`at_least`). ``positional``: an argument without a flag (a ``list`` type takes several values).
    ``help`` and ``default_text`` may be functions returning the text, called when the flags are built (text that
    reads files, e.g. the shipped recipes). ``default`` :data:`REQUIRED`: the option must be given.
    """
    meta = {"help": help, "unit": unit, "flag": flag, "metavar": metavar, "repeat": repeat,
            "default_text": default_text, "parse": parse, "key": key, "check": check, "positional": positional}
    if default is REQUIRED:  # keyword-only: a required field may follow fields with defaults
        return field(metadata=meta, kw_only=True)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    if dataclasses.is_dataclass(default):  # a section: each owner gets its own copy
        return field(default_factory=lambda: dataclasses.replace(default), metadata=meta)
    return field(default=default, metadata=meta)


def at_least(low: int | float):
    """A ``check`` for :func:`option`: the value must be ≥ ``low`` ("0 is not a whole number ≥ 1")."""

    def check(value) -> None:
        if value is not None and value < low:
            kind = "a whole number" if isinstance(value, int) else "a number"
            raise ValueError(f"{value} is not {kind} ≥ {low}")

    return check


# ------------------------------------------------------------------------------------------- parsing values
def _is_optional(hint) -> tuple[bool, Any]:
    """(True, X) for ``X | None`` / ``Optional[X]``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return True, args[0]
    return False, hint


def _to_float(value) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    try:
        number = float(str(value).strip().replace("_", "")) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a number (write e.g. 0.5, 1e-3 or 5.0e-4)") from None
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    return number


def _to_int(value) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip().replace("_", ""))
        except ValueError:
            pass
    try:
        number = _to_float(value)  # "1e3", 4.0
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number (write e.g. 300)") from None
    if not number.is_integer():
        raise ValueError(f"{value!r} is not a whole number")
    return int(number)


def _to_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"{value!r} is not true or false")


def _to_tuple(value, args: tuple, repeat: bool) -> tuple:
    if isinstance(value, str):
        parts = [p for p in re.split(r"[x×,\s]+", value.strip().lower()) if p]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    if repeat and len(parts) == 1:
        parts = parts * len(args)
    if len(parts) != len(args):
        form = "H or HxW, e.g. 256 or 256x448" if repeat else f"{len(args)} values, e.g. {_example(args)}"
        raise ValueError(f"{value!r} has {len(parts)} value(s): give {form}")
    try:
        return tuple(coerce(a, p) for a, p in zip(args, parts))
    except ValueError:
        if not repeat:
            raise
        raise ValueError(f"{value!r} is not a size: give H or HxW, e.g. 256 or 256x448") from None


def _example(args: tuple) -> str:
    return "[" + ", ".join("0.5" if a is float else "1" for a in args) + "]"


def coerce(hint, value, repeat: bool = False):
    """``value`` as type ``hint``, written the way users write it; ``ValueError`` with the reason otherwise.
    ``repeat``: a tuple type also takes one value for all its items."""
    optional, hint = _is_optional(hint)
    if value is None:
        if optional:
            return None
        raise ValueError("a value is required")
    origin = typing.get_origin(hint)
    if hint is bool:
        return _to_bool(value)
    if hint is int:
        return _to_int(value)
    if hint is float:
        return _to_float(value)
    if hint is str:
        if isinstance(value, (dict, list, tuple)):
            raise ValueError(f"{value!r} is not text")
        return str(value)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is tuple:
        return _to_tuple(value, typing.get_args(hint), repeat)
    if origin is list:
        (item,) = typing.get_args(hint)
        items = value if isinstance(value, (list, tuple)) else [value]
        return [coerce(item, v) for v in items]
    raise TypeError(f"no parser for type {hint!r}")  # a programming error, not a user's


def plain_type(hint) -> type:
    """The plain Python type behind a precise hint: ``int | None`` → int, ``Literal["a"]`` → str, a tuple → list."""
    _, inner = _is_optional(hint)
    origin = typing.get_origin(inner)
    if origin is Literal:
        return type(typing.get_args(inner)[0])
    if origin in (tuple, list):
        return list
    return inner


def hints(cls) -> dict:
    return typing.get_type_hints(cls, include_extras=False)


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def key_name(f: dataclasses.Field) -> str:
    """The option's flat key: its flag without dashes (``--t-lora-rank`` → ``t_lora_rank``), unless it says another."""
    return f.metadata.get("key") or flag_name(f)[2:].replace("-", "_")


# ------------------------------------------------------------------------------------------ nested options
class Leaf(typing.NamedTuple):
    """One option of a (possibly nested) dataclass: where it sits (``("motion", "rank")``), its field and type."""

    path: tuple[str, ...]
    field: dataclasses.Field
    hint: Any

    @property
    def key(self) -> str:
        return key_name(self.field)

    @property
    def name(self) -> str:
        return self.field.name


def is_section(hint) -> bool:
    """A field whose type is itself a dataclass of options: a nested section of the recipe."""
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def own_fields(cls) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are options (a subclass lists inherited fields its owner sets in ``NOT_OPTIONS``)."""
    hidden = getattr(cls, "NOT_OPTIONS", ())
    return [f for f in dataclasses.fields(cls) if f.name not in hidden]


def leaves(cls, path: tuple[str, ...] = ()) -> list[Leaf]:
    """Every option of dataclass ``cls``, sections flattened in order."""
    types_, out = hints(cls), []
    for f in own_fields(cls):
        if is_section(types_[f.name]):
            out += leaves(types_[f.name], path + (f.name,))
        else:
            out.append(Leaf(path + (f.name,), f, types_[f.name]))
    return out


def parse_value(f: dataclasses.Field, hint, value):
    """``value`` (as written) parsed for option field ``f`` of type ``hint``: its own ``parse`` or the type's parser,
    then its ``check``; ``ValueError`` with the reason."""
    parse = f.metadata.get("parse")
    result = parse(value) if parse else coerce(hint, value, bool(f.metadata.get("repeat")))
    if f.metadata.get("check"):
        f.metadata["check"](result)
    return result


def typed(cls, data: dict) -> dict:
    """``data`` (field → what the user wrote) parsed to the types of dataclass ``cls``; a CavError names the key."""
    types_, fields_ = hints(cls), {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for name, value in data.items():
        try:
            out[name] = parse_value(fields_[name], types_[name], value)
        except ValueError as exc:
            raise CavError(f"{key_name(fields_[name])} ({flag_name(fields_[name])}): {exc}") from None
    return out


def typed_keys(cls, data: dict) -> dict:
    """``data`` (flat key → what the user wrote: flags, manifest cells, form fields) parsed to the types of the
    options of nested dataclass ``cls``; a CavError names the key and its flag."""
    by_key = {leaf.key: leaf for leaf in leaves(cls)}
    out = {}
    for key, value in data.items():
        leaf = by_key[key]
        try:
            out[key] = parse_value(leaf.field, leaf.hint, value)
        except ValueError as exc:
            raise CavError(f"{key} ({flag_name(leaf.field)}): {exc}") from None
    return out


def coerce_fields(obj) -> None:
    """Coerce every option field of dataclass ``obj`` in place (sections check themselves); a bad value is a CavError
    naming the key and its flag."""
    types_ = hints(type(obj))
    names = [f.name for f in own_fields(type(obj)) if not is_section(types_[f.name])]
    values = typed(type(obj), {name: getattr(obj, name) for name in names})
    for name, value in values.items():
        object.__setattr__(obj, name, value)


# ------------------------------------------------------------------------------------------------ flags
def _text(value) -> str:
    """A help text or default text: a string, or a function returning one (called when the flags are built)."""
    return value() if callable(value) else value


def field_default(f: dataclasses.Field):
    """The field's default value (``REQUIRED`` if it has none)."""
    return f.default_factory() if f.default_factory is not _MISSING else f.default


def default_text(f: dataclasses.Field) -> str:
    """The default as --help shows it, with its unit."""
    if f.metadata.get("default_text"):
        return _text(f.metadata["default_text"])
    value = field_default(f)
    if value is _MISSING:
        return ""
    if isinstance(value, bool):
        text = "on" if value else "off"
    elif isinstance(value, (list, tuple)):
        text = "x".join(map(str, value)) if f.metadata.get("repeat") else " ".join(map(str, value)) or "none"
    elif value is None or value == "":
        text = "none"
    else:
        text = str(value)
    unit = f.metadata.get("unit")
    return f"{text} {unit}" if unit and text != "none" else text


def help_text(f: dataclasses.Field, hint, before_default: str = "", show_default: bool = True) -> str:
    """Field help + default (after ``before_default``, e.g. "the adapter's, else "), ``%`` escaped for argparse."""
    text = _text(f.metadata.get("help", ""))  # a Literal's choices are in the metavar
    default = default_text(f) if show_default else ""
    if default:
        text += f" [default: {before_default}{default}]"
    return text.replace("%", "%%")


def _flag_type(f: dataclasses.Field, hint):
    """An argparse ``type=`` that parses a value as the field does (its parser and check)."""

    def parse(text: str):
        try:
            return parse_value(f, hint, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    _, inner = _is_optional(hint)
    parse.__name__ = getattr(inner, "__name__", "value")
    return parse


def _own_flag(f: dataclasses.Field, hint, inner, origin) -> dict:
    """argparse arguments of a command's own option (``add_flags(defaults=True)``): the field's default, its value
    parsed when argparse reads it. A switch that is off by default is a plain switch (no --no-X, no default in the
    help); one that is on by default also has --no-X. A plain ``str`` needs no parsing; argparse's metavar unless
    the field names one."""
    default = field_default(f)
    kw: dict = {}
    if inner is bool:
        kw["action"] = argparse.BooleanOptionalAction if default else "store_true"
        if default:
            kw["default"] = default
    elif origin is list:
        kw["action"] = "append"
    elif inner is not str or f.metadata.get("parse") or f.metadata.get("check"):
        kw["type"] = _flag_type(f, hint)
    if default is _MISSING:
        kw["required"] = True
    elif "action" not in kw or kw["action"] == "append":
        kw["default"] = default
    kw["help"] = help_text(f, hint, show_default=kw.get("action") != "store_true")
    return kw


def add_flags(parser: argparse.ArgumentParser, cls, *, skip: tuple[str, ...] = (),
              before_default: dict | None = None, defaults: bool = False) -> None:
    """One flag per option of dataclass ``cls`` (a section's options as one group; dest = the flat key). Flags
    default to None (only given flags override a recipe) and keep the text the user typed: the dataclass parses and
    checks it, so a flag and a recipe key follow one rule. With ``defaults`` (a command's own options, read back
    with :func:`from_args`) flags hold the fields' defaults and are parsed and checked as argparse reads them.
    A ``positional`` option is an argument (a list: several values, at least one if it is required)."""
    sections = {f.name: f for f in dataclasses.fields(cls)}
    groups: dict = {}
    for leaf in leaves(cls):
        f, hint = leaf.field, leaf.hint
        if leaf.key in skip:
            continue
        target = parser
        if len(leaf.path) > 1:  # a section's options are one group of --help, titled as in a recipe file
            name = leaf.path[0]
            if name not in groups:
                groups[name] = parser.add_argument_group(f"recipe section {name}:",
                                                         sections[name].metadata.get("help"))
            target = groups[name]
        _, inner = _is_optional(hint)
        origin = typing.get_origin(inner)
        if f.metadata.get("positional"):
            kw = {"help": help_text(f, hint, show_default=False)}
            if origin is list:
                kw["nargs"] = "+" if field_default(f) is _MISSING else "*"
            target.add_argument(leaf.key, **kw)
            continue
        if defaults:
            kw = {"dest": leaf.key, **_own_flag(f, hint, inner, origin)}
        else:
            before = (before_default or {}).get(leaf.key, "")
            kw = {"dest": leaf.key, "default": None, "help": help_text(f, hint, before)}
            if inner is bool:
                kw["action"] = argparse.BooleanOptionalAction
            elif origin is list:
                kw["action"] = "append"
            elif origin is tuple and not f.metadata.get("repeat"):
                kw["nargs"] = len(typing.get_args(inner))
        if f.metadata.get("metavar"):
            kw["metavar"] = f.metadata["metavar"]
        elif origin is Literal:
            kw["metavar"] = "{" + ",".join(typing.get_args(inner)) + "}"
        elif not defaults and ("action" not in kw or kw["action"] == "append"):
            kw["metavar"] = {int: "N", float: "X"}.get(inner, "TEXT")
        target.add_argument(flag_name(f), **kw)


def given(args: argparse.Namespace, cls) -> dict:
    """The options of ``cls`` whose flags were given, by flat key."""
    return {leaf.key: getattr(args, leaf.key) for leaf in leaves(cls) if getattr(args, leaf.key, None) is not None}


def from_args(cls, args: argparse.Namespace):
    """The dataclass ``cls`` of a command's own options (flags added with ``add_flags(defaults=True)``) from the
    parsed arguments."""
    return cls(**{f.name: getattr(args, key_name(f)) for f in own_fields(cls)})
