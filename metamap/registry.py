"""Name -> builder tables for learners, backbones, data sources and task kinds.

A learner module registers itself with ``@register_learner("name", defaults={...})``; its
builder gets the resolved config and a :class:`DataInfo` and returns a ``MetaLearner``.
Every module in ``metamap.algorithms`` and ``metamap.data.sources`` is imported on first use,
so a new algorithm is one new file.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from metamap.errors import ConfigError


@dataclass
class DataInfo:
    """What a learner needs to know about the data to build itself."""

    example_shape: tuple[int, ...]
    problem: str = "classification"          # the task kind's name (registered with register_task_kind)
    num_train_classes: int = 0               # for learners that pre-train a classifier
    output_dim: int = 1                      # real-valued targets per example (regression kinds)
    spec: Any = None                         # ImageSpec of image data
    description: str = ""


@dataclass
class LearnerEntry:
    builder: Callable[[dict, DataInfo], nn.Module]
    defaults: dict = field(default_factory=dict)
    family: str = ""
    summary: str = ""


_LEARNERS: dict[str, LearnerEntry] = {}
_BACKBONES: dict[str, Callable[[dict, DataInfo], nn.Module]] = {}
_DATA: dict[str, Any] = {}
_KINDS: dict[str, Any] = {}
# Defaults that a plug-in brings into the config (nested like the config itself).
_DEFAULTS: dict[tuple[str, str], dict] = {}
_loaded = False
# Packages whose every module is imported on first use of the tables, so that they register.
PLUGIN_PACKAGES = ("metamap.algorithms", "metamap.nets", "metamap.data", "metamap.tasks", "metamap.rl")


def register_learner(name: str, defaults: dict | None = None, family: str = "", summary: str = ""):
    """``defaults`` is nested like a config and may touch any section, e.g.
    ``{"learner": {"inner_steps": 5}, "episode": {"ways": 5, "tasks_per_batch": 32}}``;
    it sits above the global defaults and below the user's file and overrides."""
    def deco(builder):
        _LEARNERS[name] = LearnerEntry(builder, defaults or {}, family, summary)
        return builder
    return deco


def register_backbone(name: str, defaults: dict | None = None):
    """``defaults``: the backbone's keys of the ``[model]`` section."""
    def deco(builder):
        _BACKBONES[name] = builder
        _DEFAULTS[("model", name)] = {"model": dict(defaults or {})}
        return builder
    return deco


def register_data(name: str, defaults: dict | None = None):
    """``defaults``: the source's keys of the ``[data]`` section."""
    def deco(source):
        _DATA[name] = source
        _DEFAULTS[("data", name)] = {"data": dict(defaults or {})}
        return source
    return deco


def register_task_kind(name: str):
    """Register a :class:`~metamap.tasks.kinds.TaskKind` subclass under ``name`` (``DataInfo.problem``)."""
    def deco(cls):
        cls.name = name
        _KINDS[name] = cls()
        return cls
    return deco


def task_kind(name: str):
    """The task kind a data source names in ``DataInfo.problem``."""
    return _lookup(_KINDS, name, "task kind", "DataInfo.problem")


def plugin_defaults(kind: str, name: str) -> dict:
    """Config defaults that learner / data source / backbone ``name`` brings (``kind`` = learner|data|model)."""
    _load_plugins()
    if kind == "learner":
        return learner_defaults(name)
    table = {"data": (_DATA, "data set", "data.name"), "model": (_BACKBONES, "backbone", "model.backbone")}[kind]
    _lookup(*table[:1], name, *table[1:])
    return _DEFAULTS[(kind, name)]


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


def learners() -> dict[str, LearnerEntry]:
    _load_plugins()
    return dict(_LEARNERS)


def _lookup(table: dict, name: str, what: str, key: str):
    _load_plugins()
    if not isinstance(name, str) or name not in table:
        raise ConfigError(f"unknown {what} {name!r} ({key}); choose one of: {', '.join(sorted(table))}")
    return table[name]


def learner_defaults(name: str) -> dict:
    """A learner's defaults for any section (e.g. ``{"episode": {"tasks_per_batch": 32}}``)."""
    return _lookup(_LEARNERS, name, "learner", "learner.name").defaults


def data_source(config: dict):
    return _lookup(_DATA, config["data"]["name"], "data set", "data.name")()


def build_backbone(config: dict, info: DataInfo) -> nn.Module:
    return _lookup(_BACKBONES, config["model"]["backbone"], "backbone", "model.backbone")(config["model"], info)


def build_learner(config: dict, info: DataInfo) -> nn.Module:
    """The learner ``config`` names, for the data ``info`` describes (and its task kind)."""
    kind = task_kind(info.problem)
    learner = _lookup(_LEARNERS, config["learner"]["name"], "learner", "learner.name").builder(config, info)
    learner.kind = kind
    learner.example_shape = tuple(info.example_shape)        # for adapt()'s checks of its inputs
    return learner


def options(section: dict, allowed: dict[str, Any], where: str) -> dict:
    """``section``'s values for the keys in ``allowed`` (default values), refusing unknown keys."""
    unknown = set(section) - set(allowed) - {"name", "backbone"}
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(sorted(unknown))} in [{where}]; "
                          f"known: {', '.join(sorted(allowed))}")
    return {k: section.get(k, v) for k, v in allowed.items()}
