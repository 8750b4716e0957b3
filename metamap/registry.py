"""Name -> plug-in tables for learners, backbones, data sources and task kinds.

A plug-in registers itself with its options dataclass (:mod:`metamap.options`), the single
source of the keys, defaults and types of its config section::

    @register_learner("matching", options=MatchingOptions, family="metric", summary="...")
    def _build(config: dict, info: DataInfo) -> MatchingNetwork: ...

``defaults`` (optional) are the plug-in's preferred values for *other* sections, nested like a
config (MAML: ``{"episode": {"tasks_per_batch": 32}}``; MANN: ``{"model": {"backbone":
"flatten"}}``); they sit above the global defaults and below the user's file and overrides.
Every module in ``metamap.algorithms``, ``metamap.nets``, ``metamap.data`` and
``metamap.tasks`` is imported on first use, so a new algorithm is one new file.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from metamap.errors import ConfigError
from metamap.options import NoOptions, Options


@dataclass
class DataInfo:
    """What a learner needs to know about the data to build itself."""

    example_shape: tuple[int, ...]
    problem: str = "classification"          # the task kind's name (registered with register_task_kind)
    num_train_classes: int = 0               # for learners that pre-train a classifier
    output_dim: int = 1                      # real-valued targets per example (regression kinds)
    spec: Any = None                         # ImageSpec of image data
    description: str = ""

    def image_shape(self, backbone: str, hint: str = "") -> tuple[int, int, int]:
        """``(channels, height, width)``, or a ConfigError if the examples are not images."""
        if len(self.example_shape) != 3:
            raise ConfigError(f"model.backbone = '{backbone}' needs image data [channels, height, width], not "
                              f"examples of shape {list(self.example_shape)}{hint}")
        return tuple(self.example_shape)


@dataclass
class Plugin:
    """A registered learner, backbone or data source."""

    kind: str                                 # "learner" | "model" | "data": its config section
    name: str
    build: Callable                           # learner: (config, info); backbone: (options, info); data: a class
    options: type[Options] = NoOptions
    defaults: dict = field(default_factory=dict)   # its values for other sections
    family: str = ""
    summary: str = ""


# The config section of each kind of plug-in, and the key in it that chooses one.
SELECTORS = {"data": "name", "model": "backbone", "learner": "name"}
KIND_NAMES = {"data": "data set", "model": "backbone", "learner": "learner"}
_PLUGINS: dict[str, dict[str, Plugin]] = {kind: {} for kind in SELECTORS}
_KINDS: dict[str, Any] = {}
_loaded = False
# Packages whose every module is imported on first use of the tables, so that they register.
PLUGIN_PACKAGES = ("metamap.algorithms", "metamap.nets", "metamap.data", "metamap.tasks", "metamap.rl")


def _register(kind: str, name: str, options, defaults, **extra):
    options = options or NoOptions
    if not (isinstance(options, type) and issubclass(options, Options)):
        raise TypeError(f"{kind} {name!r}: options must be an Options dataclass, not {options!r}")
    if options.section not in ("", kind):
        raise TypeError(f"{kind} {name!r}: {options.__name__}.section is {options.section!r}, not {kind!r}")

    def deco(obj):
        _PLUGINS[kind][name] = Plugin(kind, name, obj, options, dict(defaults or {}), **extra)
        return obj
    return deco


def register_learner(name: str, options: type[Options] | None = None, defaults: dict | None = None,
                     family: str = "", summary: str = ""):
    """Register ``builder(config, info) -> MetaLearner`` with its ``[learner]`` options."""
    return _register("learner", name, options, defaults, family=family, summary=summary)


def register_backbone(name: str, options: type[Options] | None = None, defaults: dict | None = None):
    """Register ``builder(options, info) -> nn.Module`` (with ``out_features``) with its ``[model]`` options."""
    return _register("model", name, options, defaults)


def register_data(name: str, options: type[Options] | None = None, defaults: dict | None = None):
    """Register a data source class with its ``[data]`` options."""
    return _register("data", name, options, defaults)


def register_task_kind(name: str):
    """Register a :class:`~metamap.tasks.kinds.TaskKind` subclass under ``name`` (``DataInfo.problem``)."""
    def deco(cls):
        cls.name = name
        _KINDS[name] = cls()
        return cls
    return deco


def task_kind(name: str):
    """The task kind a data source names in ``DataInfo.problem``."""
    _load_plugins()
    if not isinstance(name, str) or name not in _KINDS:
        raise ConfigError(f"unknown task kind {name!r} (DataInfo.problem); choose one of: {', '.join(sorted(_KINDS))}")
    return _KINDS[name]


def _load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    # Plug-ins depend on this registry, not the other way round: they are found by package name.
    for name in PLUGIN_PACKAGES:
        pkg = importlib.import_module(name)
        for mod in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{pkg.__name__}.{mod.name}")


def plugin(kind: str, name) -> Plugin:
    """The plug-in ``name`` of ``kind`` ("learner", "model" or "data"), or a ConfigError listing the choices."""
    _load_plugins()
    table = _PLUGINS[kind]
    if not isinstance(name, str) or name not in table:
        raise ConfigError(f"unknown {KIND_NAMES[kind]} {name!r} ({kind}.{SELECTORS[kind]}); "
                          f"choose one of: {', '.join(sorted(table))}")
    return table[name]


def plugins(kind: str) -> dict[str, Plugin]:
    _load_plugins()
    return dict(_PLUGINS[kind])


def learners() -> dict[str, Plugin]:
    return plugins("learner")


def section_options(config: dict, kind: str) -> Options:
    """The typed options of a resolved config's ``[data]``, ``[model]`` or ``[learner]`` section."""
    key = SELECTORS[kind]
    section = config[kind]
    return plugin(kind, section[key]).options.from_section(
        section, ignore=(key,), where=f"[{kind}] ({kind}.{key} = {section[key]!r})")


def data_source(config: dict):
    return plugin("data", config["data"]["name"]).build()


def build_backbone(config: dict, info: DataInfo) -> nn.Module:
    return plugin("model", config["model"]["backbone"]).build(section_options(config, "model"), info)


def build_learner(config: dict, info: DataInfo) -> nn.Module:
    """The learner ``config`` names, for the data ``info`` describes (and its task kind)."""
    kind = task_kind(info.problem)
    learner = plugin("learner", config["learner"]["name"]).build(config, info)
    learner.kind = kind
    learner.example_shape = tuple(info.example_shape)        # for adapt()'s checks of its inputs
    return learner
