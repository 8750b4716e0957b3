"""Typed options: one frozen dataclass per plug-in, the single source of its keys, defaults and types.

A plug-in (data source, backbone, learner) or a fixed config section (optimizer, schedule,
trainer, evaluation) declares its options once::

    @dataclass(frozen=True, kw_only=True)
    class MatchingOptions(Options):
        fce: bool = option(False, role=ARCHITECTURE, doc="full-context embeddings")
        fce_steps: int = option(5, low=0, role=ARCHITECTURE)
        scale: float = option(1.0, low=0, low_open=True, role=ARCHITECTURE)

Building one (``MatchingOptions(fce=True)``, or :meth:`Options.from_section` on a config
section) checks every value against its annotation (bool, int, float, str, ``Literal``,
``list[...]``, unions of these), its range and finiteness, then the class's :meth:`check`
for rules across fields; a bad value raises :class:`ConfigError` naming the key, what it must
be, and the value given. Whole numbers are bounded to 64 bits, numbers must be finite.

Each field has a *role* (see :data:`ROLES`), so that code can tell what changing it means:
``architecture`` changes parameters or modules (a checkpoint fixes it), ``adaptation`` changes
only what ``adapt`` does with trained weights (e.g. the number of inner steps at test time),
``training`` matters only while meta-training, ``runtime`` changes speed or memory, not results,
and ``data`` says where data lives and how it is read.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import types
import typing
from typing import Any, ClassVar, Literal, Union

from metamap.errors import ConfigError

ARCHITECTURE, ADAPTATION, TRAINING, RUNTIME, DATA = "architecture", "adaptation", "training", "runtime", "data"
ROLES = (ARCHITECTURE, ADAPTATION, TRAINING, RUNTIME, DATA)
MAX_INT = 2**63 - 1          # TOML integers are 64-bit; so are torch's and numpy's seeds
# Step sizes and scales: beyond this a value only ever overflows (1e30 is refused when the config
# resolves); up to it, a run that diverges is stopped by the trainer's divergence guard.
MAX_STEP = 1e6


def option(default: Any, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False, length: int | None = None, nonempty: bool = False,
           role: str = ARCHITECTURE, doc: str = "") -> Any:
    """A field with its default, bounds (numbers, and the items of lists) and role.

    ``low``/``high`` are inclusive unless ``low_open``/``high_open``; ``length`` fixes the
    length of a list, ``nonempty`` asks for at least one item.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    meta = {"low": low, "high": high, "low_open": low_open, "high_open": high_open, "length": length,
            "nonempty": nonempty, "role": role, "doc": doc}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class _Mismatch(Exception):
    """A value does not conform to a type; the message says what was expected."""


def _number(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def _bounds(meta: dict) -> str:
    if meta.get("low") == 0 and meta.get("low_open") and meta.get("high") is None:
        return ""                                   # said as "positive"
    if meta.get("low") is not None and meta.get("high") is not None and not (meta["low_open"] or meta["high_open"]):
        return f" from {_number(meta['low'])} to {_number(meta['high'])}"
    parts = []
    if meta.get("low") is not None:
        parts.append(f"{'>' if meta['low_open'] else '>='} {_number(meta['low'])}")
    if meta.get("high") is not None:
        parts.append(f"{'<' if meta['high_open'] else '<='} {_number(meta['high'])}")
    return (" " + " and ".join(parts)) if parts else ""


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def describe(tp, meta: dict, plural: bool = False) -> str:
    """What a value of type ``tp`` with these bounds must be, in words ("a whole number >= 1")."""
    origin = typing.get_origin(tp)
    if tp is bool:
        return "true or false"
    positive = "positive " if meta.get("low") == 0 and meta.get("low_open") and meta.get("high") is None else ""
    if tp is int:
        return (f"{positive}whole numbers" if plural else f"a {positive}whole number") + _bounds(meta)
    if tp is float:
        return (f"{positive}numbers" if plural else f"a {positive}number") + _bounds(meta)
    if tp is str:
        return "strings" if plural else "a string"
    if tp is dict:
        return "tables" if plural else "a table (section)"
    if origin is Literal:
        choices = ['""' if c == "" else str(c) for c in typing.get_args(tp)]
        return choices[0] if len(choices) == 1 else ", ".join(choices[:-1]) + " or " + choices[-1]
    if origin in (list, tuple):
        n = meta.get("length")
        what = describe(typing.get_args(tp)[0], meta, plural=True)
        return f"a list of {n} {what}" if n else f"a{' non-empty' if meta.get('nonempty') else ''} list of {what}"
    if _is_union(tp):
        return " or ".join(describe(a, meta, plural) for a in typing.get_args(tp))
    raise TypeError(f"unsupported option type {tp!r}")


def _in_bounds(v: float, meta: dict) -> bool:
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (v <= low if meta["low_open"] else v < low):
        return False
    return not (high is not None and (v >= high if meta["high_open"] else v > high))


def conform(value: Any, tp, meta: dict) -> Any:
    """``value`` as type ``tp`` (ints become floats where a float is asked for; tuples become
    lists), or :class:`_Mismatch`."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool) and -MAX_INT - 1 <= value <= MAX_INT \
                and _in_bounds(value, meta):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and _in_bounds(value, meta):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return copy.deepcopy(value)
    elif origin is Literal:
        # Exact types: True must not pass for 1, nor 1.0 for 1.
        for choice in typing.get_args(tp):
            if type(value) is type(choice) and value == choice:
                return value
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            n = meta.get("length")
            if (n is None or len(value) == n) and not (meta.get("nonempty") and not value):
                item = typing.get_args(tp)[0]
                try:
                    return [conform(v, item, meta) for v in value]
                except _Mismatch:
                    pass
    elif _is_union(tp):
        for arm in typing.get_args(tp):
            try:
                return conform(value, arm, meta)
            except _Mismatch:
                continue
    else:
        raise TypeError(f"unsupported option type {tp!r}")
    raise _Mismatch(describe(tp, meta))


def show(value: Any) -> str:
    """A value as the user would write it in TOML (``true``, ``"abc"``, ``[1, 2]``)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    """Base of every options dataclass; see the module docstring."""

    section: ClassVar[str] = ""           # the config section, for messages ("learner")

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            try:
                object.__setattr__(self, f.name, conform(value, hints[f.name], f.metadata))
            except _Mismatch as e:
                doc = f" ({f.metadata['doc']})" if f.metadata["doc"] else ""
                raise ConfigError(f"{self.key(f.name)} must be {e}{doc}, not {show(value)}") from None
        self.check()

    def key(self, name: str) -> str:
        return f"{self.section}.{name}" if self.section else name

    def check(self) -> None:
        """Rules that involve several fields; raise :class:`ConfigError`."""

    def fail(self, message: str) -> None:
        raise ConfigError(message)

    @classmethod
    def upgrade(cls, section: dict) -> dict:
        """A section with renamed or retired keys -> today's keys (or a ConfigError saying what
        replaced them). Applied to the user's files and overrides and to checkpoints' configs."""
        return section

    @classmethod
    def upgrade_checkpoint(cls, section: dict) -> dict:
        """A section read from an older checkpoint -> today's keys; by default :meth:`upgrade`.
        Override it to drop keys older checkpoints saved but that never meant anything."""
        return cls.upgrade(section)

    @classmethod
    def from_section(cls, section: dict, ignore: tuple[str, ...] = (), where: str = "") -> Options:
        """Options from a config section; keys not given take their defaults, unknown keys are refused."""
        known = field_names(cls)
        unknown = sorted(set(section) - set(known) - set(ignore))
        if unknown and not where:
            keys = ", ".join(repr(f"{cls.section}.{k}" if cls.section else k) for k in unknown)
            raise ConfigError(f"unknown config key {keys}; known keys of [{cls.section or 'the top level'}]: "
                              f"{', '.join(known) or '(none)'}")
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {where}; known: {', '.join(known) or '(none)'}")
        given = {k: v for k, v in section.items() if k in known}
        for f in dataclasses.fields(cls):          # a table given for a table field adds to its default
            if f.name in given and isinstance(given[f.name], dict) and f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
                if isinstance(default, dict):
                    given[f.name] = {**default, **given[f.name]}
        return cls(**given)

    def to_dict(self) -> dict:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def with_defaults(cls, name: str, **defaults) -> type[Options]:
        """A subclass of this class with other defaults (e.g. first-order MAML's ``first_order = true``)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        bad = sorted(set(defaults) - set(fields))
        if bad:
            raise TypeError(f"{cls.__name__} has no option {', '.join(bad)}")
        hints = typing.get_type_hints(cls)
        new = [(k, hints[k], option(v, **{m: fields[k].metadata[m] for m in fields[k].metadata}))
               for k, v in defaults.items()]
        sub = dataclasses.make_dataclass(name, new, bases=(cls,), frozen=True, kw_only=True)
        sub.__module__ = cls.__module__
        sub.__doc__ = f"{cls.__name__} with other defaults: " + ", ".join(f"{k} = {show(v)}"
                                                                           for k, v in defaults.items())
        return sub


@functools.cache
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def field_names(cls: type[Options]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def defaults(cls: type[Options]) -> dict:
    """The options' defaults as a config section."""
    return cls().to_dict()


def roles(cls: type[Options]) -> dict[str, str]:
    """Field name -> role (:data:`ROLES`)."""
    return {f.name: f.metadata["role"] for f in dataclasses.fields(cls)}


def docs(cls: type[Options]) -> dict[str, str]:
    """Field name -> one line: type, default and description (for ``metamap learners`` and docs)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f"{describe(hints[f.name], f.metadata)}, default {show(default)} ({f.metadata['role']})"
        out[f.name] = text + (f": {f.metadata['doc']}" if f.metadata["doc"] else "")
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoOptions(Options):
    """A plug-in without options of its own."""
