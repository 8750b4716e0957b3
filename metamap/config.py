"""Experiment configuration: typed sections, TOML files, and ``key=value`` overrides.

A resolved config is a nested dict with every key of every section, each checked by that
section's options dataclass (:mod:`metamap.options`): the fixed sections below, and the
``[data]``, ``[model]`` and ``[learner]`` sections of the chosen data source, backbone and
learner (:mod:`metamap.registry`). Precedence, lowest first: the options' defaults, the chosen
plug-ins' defaults for other sections (MAML: a meta-batch of 32), a checkpoint's config (for
``--resume`` and ``eval``), the config file, then command-line overrides (``--set
section.key=value`` and the named flags, each of which is an override of one key).
"""
from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from metamap.errors import ConfigError
from metamap.options import ADAPTATION, MAX_INT, MAX_STEP, RUNTIME, TRAINING, Options, field_names, option
SEED_RANGE = {"low": 0, "high": MAX_INT}


@dataclass(frozen=True, kw_only=True)
class RootOptions(Options):
    """Top-level keys."""

    seed: int = option(0, **SEED_RANGE, role=TRAINING, doc="seed of every random choice: weights and episodes")


@dataclass(frozen=True, kw_only=True)
class EpisodeOptions(Options):
    """Meta-training tasks: N-way K-shot Q-query, ``tasks_per_batch`` per meta-batch."""

    section = "episode"
    ways: int = option(20, low=1, role=TRAINING, doc="classes per task (N)")
    shots: int = option(1, low=1, role=TRAINING, doc="support examples per class (K)")
    queries: int = option(15, low=1, role=TRAINING, doc="query examples per class (per task for regression)")
    # Bounded as inner steps are: a larger meta-batch takes minutes per step on a CPU with no word.
    tasks_per_batch: int = option(1, low=1, high=10_000, role=TRAINING, doc="tasks per meta-batch")


OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass(frozen=True, kw_only=True)
class OptimOptions(Options):
    """The outer (meta) optimizer."""

    section = "optim"
    name: Literal["adam", "adamw", "sgd"] = option("adam", role=TRAINING)
    lr: float = option(1e-3, low=0, low_open=True, high=MAX_STEP, role=TRAINING, doc="outer learning rate")
    weight_decay: float = option(0.0, low=0, high=MAX_STEP, role=TRAINING)
    grad_clip: float = option(0.0, low=0, role=TRAINING, doc="largest gradient norm; 0 = no clipping")
    momentum: float = option(0.0, low=0, high=1, role=TRAINING, doc="for name = sgd")
    nesterov: bool = option(False, role=TRAINING, doc="for name = sgd")

    def check(self) -> None:
        if self.name != "sgd" and (self.momentum or self.nesterov):
            self.fail(f"optim.momentum and optim.nesterov apply to optim.name = \"sgd\" only, not {self.name!r}; "
                      "remove them or choose sgd")
        if self.nesterov and not self.momentum:
            self.fail("optim.nesterov = true needs optim.momentum > 0")


SCHEDULES = ("constant", "step", "cosine", "linear")


@dataclass(frozen=True, kw_only=True)
class ScheduleOptions(Options):
    """Learning-rate schedule, a pure function of the step (see :mod:`metamap.train.schedule`)."""

    section = "schedule"
    name: Literal["constant", "step", "cosine", "linear"] = option("step", role=TRAINING)
    step_size: int = option(500, low=1, role=TRAINING, doc="name = step: steps between decays")
    gamma: float = option(0.5, low=0, high=1, low_open=True, role=TRAINING, doc="name = step: factor per decay")
    warmup: int = option(0, low=0, role=TRAINING, doc="steps of linear warm-up first")
    min_lr: float = option(0.0, low=0, high=MAX_STEP, role=TRAINING,
                           doc="name = cosine or linear: the final learning rate")


@dataclass(frozen=True, kw_only=True)
class TrainOptions(Options):
    """The trainer: loop length, logging, validation, checkpoints, devices, precision."""

    section = "train"
    steps: int = option(1500, low=0, role=TRAINING, doc="meta-batches")
    log_every: int = option(20, low=1, role=TRAINING)
    val_every: int = option(500, low=0, role=TRAINING,
                            doc="0 = no validation; the last checkpoint is then also the best")
    val_episodes: int = option(300, low=1, role=TRAINING)
    val_seed: int = option(7, **SEED_RANGE, role=TRAINING)
    checkpoint_every: int = option(500, low=1, role=TRAINING)
    device: str = option("cpu", role=RUNTIME, doc="cpu, cuda, cuda:N or auto")
    threads: int = option(0, low=0, high=4096, role=RUNTIME, doc="0 = one per core")
    channels_last: bool = option(True, role=RUNTIME, doc="faster convolutions on CPU")
    tune_allocator: bool = option(True, role=RUNTIME, doc="keep freed memory in-process (glibc mallopt)")
    max_bad_steps: int = option(10, low=0, role=TRAINING,
                                doc="non-finite losses or gradients tolerated before the run stops")
    max_weight_growth: float = option(1e4, low=0, role=TRAINING,
                                      doc="the run stops when the weights' norm exceeds this times its start; 0 = off")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", role=RUNTIME, doc="auto: bf16 where the hardware has it and the learner's accuracy was measured "
        "unchanged, else fp32; bf16: autocast on CPU or GPU; fp16: autocast and a gradient scaler, GPU only")
    chunk_tasks: Literal["auto"] | int = option(
        "auto", low=0, role=RUNTIME, doc="tasks per forward/backward pass; 0 = the whole meta-batch")
    prefetch: Literal["auto"] | bool = option("auto", role=RUNTIME,
                                              doc="draw the next batch in a background thread (auto = on CUDA)")
    report: bool = option(True, role=RUNTIME, doc="write report.html at the end")
    tensorboard: bool = option(False, role=RUNTIME, doc="also log to RUN/tensorboard")

    def check(self) -> None:
        d = self.device
        if not (d in ("cpu", "cuda", "auto") or (d.startswith("cuda:") and d[5:].isdigit())):
            self.fail(f"train.device must be cpu, cuda, cuda:N or auto, not {d!r}")


FINETUNE_AUGMENTATIONS = ("flip", "color", "translation")


@dataclass(frozen=True, kw_only=True)
class EvalOptions(Options):
    """Test episodes: every combination of ``ways`` x ``shots``, fixed by ``seed``."""

    section = "eval"
    ways: list[int] | int = option([5, 20], low=1, nonempty=True, role=ADAPTATION)
    shots: list[int] | int = option([1], low=1, nonempty=True, role=ADAPTATION)
    queries: int = option(15, low=1, role=ADAPTATION, doc="query examples per class")
    episodes: int = option(1000, low=1, role=ADAPTATION)
    seed: int = option(2024, **SEED_RANGE, role=ADAPTATION)
    tasks_per_batch: int = option(0, low=0, role=RUNTIME, doc="0 = choose from the episode size")
    cache_mb: float = option(1024, low=0, role=RUNTIME,
                             doc="learners that encode examples one by one: MB of codes kept; 0 = per episode")
    protocol: Literal["", "bscd-fsl"] = option(
        "", role=ADAPTATION, doc="a named protocol that fixes ways, shots, queries and episodes; see config.PROTOCOLS")
    # Test-time fine-tuning on each episode's support set (metamap/train/test_time.py).
    finetune: bool | Literal["auto", "on", "off"] = option(False, role=ADAPTATION)
    finetune_lr: Literal["auto"] | float = option(
        "auto", low=0, high=MAX_STEP, role=ADAPTATION, doc="auto = picked on episodes of the validation classes")
    finetune_steps: Literal["auto"] | int = option("auto", low=0, high=10_000, role=ADAPTATION)
    finetune_lrs: list[float] = option([0.0, 1e-4, 1e-3, 1e-2], low=0, high=MAX_STEP, nonempty=True, role=ADAPTATION,
                                       doc="candidates of finetune_lr = auto; 0 = no fine-tuning")
    finetune_steps_grid: list[int] = option([10, 25, 50], low=1, high=10_000, nonempty=True, role=ADAPTATION,
                                            doc="candidates of finetune_steps = auto")
    finetune_episodes: int = option(30, low=1, role=ADAPTATION, doc="labelled episodes the automatic choice uses")
    finetune_augment: list[Literal["flip", "color", "translation"]] = option(
        ["translation"], role=ADAPTATION,
        doc="augmentations of the support set: translation (default), flip, color (P>M>F's three, for "
            "natural images; a mirrored character can be another character)")
    finetune_aug_prob: float = option(0.9, low=0, high=1, role=ADAPTATION)
    finetune_norm: Literal["auto"] | float = option(
        "auto", low=0, high=1, role=ADAPTATION,
        doc="weight of the support set's batch-norm statistics against the checkpoint's (0 = theirs alone)")
    finetune_norms: list[float] = option([0.0, 0.5, 1.0], low=0, high=1, nonempty=True, role=ADAPTATION,
                                         doc="candidates of finetune_norm = auto")
    finetune_params: Literal["all", "norm", "auto"] = option(
        "all", role=ADAPTATION, doc="weights fine-tuned: all, or norm = the normalisation layers' scales and shifts")
    finetune_rule: Literal["paired", "mean"] = option(
        "paired", role=ADAPTATION,
        doc="automatic choice: paired = keep the simpler unless the paired gain's 95% lower bound is > 0; "
            "mean = the best mean")

    def __post_init__(self) -> None:
        super().__post_init__()
        for k in ("ways", "shots"):                  # one number means a list of one
            if not isinstance(getattr(self, k), list):
                object.__setattr__(self, k, [getattr(self, k)])
        for k, v in PROTOCOLS.get(self.protocol, {}).items():
            object.__setattr__(self, k, copy.deepcopy(v))


def finetune_enabled(e: dict) -> bool:
    """Whether an ``[eval]`` section asks for test-time fine-tuning (metamap/train/test_time.py)."""
    return e["finetune"] in (True, "on", "auto")


def check_finetune(e: dict) -> None:
    """Check the ``eval.finetune*`` keys of ``e`` (as :class:`EvalOptions` does)."""
    EvalOptions(**{k: v for k, v in e.items() if k.startswith("finetune")})


# Named evaluation protocols (eval.protocol): each fixes these [eval] keys. BSCD-FSL (Guo et al.
# 2020): 5-way, 1/5/20/50 shots, 15 queries, 600 fixed episodes, on a domain never meta-trained on.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "bscd-fsl": {"ways": [5], "shots": [1, 5, 20, 50], "queries": 15, "episodes": 600},
}


# The fixed sections, in the order configs are written.
SECTIONS: dict[str, type[Options]] = {"episode": EpisodeOptions, "optim": OptimOptions,
                                      "schedule": ScheduleOptions, "train": TrainOptions, "eval": EvalOptions}
# The plug-in sections, the key that chooses the plug-in, and the default choice.
PLUGIN_SECTIONS = {"data": ("name", "omniglot"), "model": ("backbone", "conv4"), "learner": ("name", "protonet")}
ORDER = ("data", "model", "learner", *SECTIONS)


def deep_merge(base: dict, update: dict, path: str = "", strict: bool = False) -> dict:
    """``update`` over ``base``, section by section. ``strict`` refuses keys ``base`` lacks."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        where = f"{path}{key}"
        if strict and key not in base:
            raise ConfigError(f"unknown config key {where!r}; known keys here: {', '.join(sorted(base)) or '(none)'}")
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = deep_merge(base[key], value, where + ".", strict)
        elif isinstance(base.get(key), dict) and not isinstance(value, dict):
            raise ConfigError(f"config key {where!r} is a section; set one of its keys, e.g. {where}.name=...")
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_value(text: str) -> Any:
    """A TOML value (``3``, ``1e-3``, ``true``, ``[5, 20]``, ``"x"``), else the text as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_override(item: str) -> dict:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r} has an empty key part")
    nested: dict = {parts[-1]: parse_value(text.strip())}
    for p in reversed(parts[:-1]):
        nested = {p: nested}
    return nested


def load_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    kind = "JSON" if path.suffix == ".json" else "TOML"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                          f"save it as UTF-8 {kind}") from None
    try:
        return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid {kind}: {e}") from None


def resolve(file: str | Path | None = None, overrides: list[str] | tuple = (),
            base: dict | None = None) -> dict:
    """The complete, checked config: defaults <- plug-in defaults <- ``base`` (a checkpoint's
    config) <- ``file`` <- ``overrides``.

    Every key of every section is present in the result, so the result is all a checkpoint
    needs to rebuild its learner, whatever the defaults are on the day it is loaded. Keys that
    ``base`` lacks (checkpoints written before a key existed) take today's defaults; keys an
    options class retired are translated by its ``upgrade``.
    """
    user: dict = {}
    for layer in [load_file(file) if file else {}, *(parse_override(o) for o in overrides)]:
        user = deep_merge(user, _shape(layer))
    return complete(user, _shape(base or {}))


def _shape(layer: dict) -> dict:
    """Refuse unknown sections and top-level keys, and sections given as values, before merging."""
    if not isinstance(layer, dict):
        raise ConfigError(f"a config must be a table of sections, not {type(layer).__name__}")
    known = ("seed", *PLUGIN_SECTIONS, *SECTIONS)
    for key, value in layer.items():
        if key not in known:
            raise ConfigError(f"unknown config key {key!r}; known keys here: {', '.join(sorted(known))}")
        if key == "seed" and isinstance(value, dict):
            raise ConfigError("config key 'seed' is a number, not a section")
        if key != "seed" and not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} is a section; set one of its keys, e.g. {key}.name=...")
    return layer


def complete(user: dict, base: dict | None = None) -> dict:
    """Choose the plug-ins, apply their defaults until the choice settles, check every section."""
    from metamap.registry import plugin  # late: the registry imports the plug-ins

    base = base or {}
    given = deep_merge(base, user)
    recipe: dict = {}
    choice = None
    for _ in range(len(PLUGIN_SECTIONS) + 2):
        merged = deep_merge(recipe, given)
        now = {s: merged.get(s, {}).get(key, default) for s, (key, default) in PLUGIN_SECTIONS.items()}
        if now == choice:
            break
        choice = now
        # A plug-in's defaults for other sections (MANN chooses the flatten backbone, whose own
        # defaults then apply): data source, then backbone, then learner, the later winning.
        recipe = {}
        for kind in PLUGIN_SECTIONS:
            recipe = deep_merge(recipe, plugin(kind, choice[kind]).defaults)
    else:
        raise ConfigError(f"the plug-ins' defaults do not settle on one choice ({choice}); set "
                          "data.name, model.backbone and learner.name explicitly")
    out: dict = RootOptions.from_section({k: v for k, v in merged.items() if k == "seed"}).to_dict()
    for section in ORDER:
        if section in PLUGIN_SECTIONS:
            key = PLUGIN_SECTIONS[section][0]
            options = plugin(section, choice[section]).options
            where = f"[{section}] ({section}.{key} = {choice[section]!r})"
            old = options.upgrade_checkpoint(dict(base.get(section, {}))) if base.get(section, {}).get(key) in (
                None, choice[section]) else {}
        else:
            key, options, where = None, SECTIONS[section], ""
            old = options.upgrade_checkpoint(dict(base.get(section, {})))
        known = set(field_names(options))
        # Defaults the plug-ins chose for keys this section's options do not have are dropped
        # (MANN's recipe names no conv4 keys, say); the user's and the checkpoint's keys are checked.
        values = {k: v for k, v in recipe.get(section, {}).items() if k in known}
        values = deep_merge(values, {k: v for k, v in old.items() if k != key})
        values = deep_merge(values, options.upgrade({k: v for k, v in user.get(section, {}).items() if k != key}))
        checked = options.from_section(values, where=where).to_dict()
        out[section] = {key: choice[section], **checked} if key else checked
    if out["schedule"]["min_lr"] > out["optim"]["lr"]:
        low, lr = out["schedule"]["min_lr"], out["optim"]["lr"]
        raise ConfigError(f"schedule.min_lr = {low!r} is above optim.lr = {lr!r}, so the schedule would raise the "
                          "learning rate; choose schedule.min_lr <= optim.lr")
    return out


def section(config: dict, name: str) -> Options:
    """The typed options of section ``name`` of a resolved config (``config.section(c, "train").steps``)."""
    if name in PLUGIN_SECTIONS:
        from metamap.registry import section_options
        return section_options(config, name)
    if name == "seed":
        return RootOptions(seed=config["seed"])
    return SECTIONS[name].from_section(config[name])


def defaults() -> dict:
    """The default experiment's complete config."""
    return resolve()


def dumps(config: dict) -> str:
    """The config as TOML text (for printing and for `config.toml` beside checkpoints)."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):            # an inline table, e.g. one domain of a mixture
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        raise ConfigError(f"cannot write {v!r} to TOML")

    for k, v in config.items():
        if not isinstance(v, dict):
            lines.append(f"{k} = {value(v)}")
    for k, v in config.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"
