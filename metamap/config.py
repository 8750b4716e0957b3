"""Experiment configuration: defaults, TOML files, and ``key=value`` overrides.

A config is a nested dict. Precedence, lowest first: built-in defaults, the config file,
the learner's own defaults for keys the file leaves unset, then command-line overrides
(``--set section.key=value`` and the named flags, each of which is an override of one key).
"""
from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from metamap.errors import ConfigError

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    # The keys of [data], [model] and [learner] beyond the name come from the chosen data
    # source, backbone and learner (their registered defaults), e.g. data.split for Omniglot.
    "data": {"name": "omniglot"},
    "model": {"backbone": "conv4"},
    "learner": {"name": "protonet"},
    "episode": {"ways": 20, "shots": 1, "queries": 15, "tasks_per_batch": 1},
    "optim": {"name": "adam", "lr": 1e-3, "weight_decay": 0.0, "grad_clip": 0.0,
              "momentum": 0.0, "nesterov": False},   # momentum/nesterov: for name = "sgd"
    "schedule": {"name": "step", "step_size": 500, "gamma": 0.5, "warmup": 0, "min_lr": 0.0},
    "train": {
        "steps": 1500,
        "log_every": 20,
        "val_every": 500,          # 0 = no validation; the last checkpoint is then also the best
        "val_episodes": 300,
        "val_seed": 7,
        "checkpoint_every": 500,
        "device": "cpu",
        "threads": 0,              # 0 = torch's default (one per core)
        "channels_last": True,     # faster convolutions on CPU
        "tune_allocator": True,    # keep freed memory in-process (glibc mallopt); faster on CPU
        "max_bad_steps": 10,       # non-finite losses/gradients tolerated before the run stops
        "max_weight_growth": 1e4,  # the run stops when the weights' norm exceeds this x its start (0 = off)
        "precision": "auto",       # auto (bf16 where the hardware has it and the learner's accuracy is
                                   # measured unchanged, else fp32) | fp32 | bf16 (autocast, CPU or GPU)
                                   # | fp16 (autocast + grad scaler, GPU)
        "chunk_tasks": "auto",     # tasks per forward/backward pass (same gradient): 0 = the whole
                                   # meta-batch, auto = the learner's choice (MetaLearner.preferred_chunk)
        "prefetch": "auto",        # draw the next batch in a background thread (auto = on CUDA)
        "report": True,            # write report.html (curves, test episodes, results) at the end
        "tensorboard": False,      # also log scalars to RUN/tensorboard (needs the tensorboard package)
    },
    "eval": {
        "ways": [5, 20],           # every combination of ways x shots is evaluated
        "shots": [1],
        "queries": 15,
        "episodes": 1000,
        "seed": 2024,
        "tasks_per_batch": 0,      # 0 = choose from the episode size
        "cache_mb": 1024,          # learners that encode examples one by one: encode each distinct
                                   # example once, keeping this many MB of codes (0 = per episode)
        "protocol": "",            # a named protocol fixes ways, shots, queries and episodes (PROTOCOLS)
        # Test-time fine-tuning on each episode's support set (metamap/train/test_time.py):
        "finetune": False,         # true | false
        "finetune_lr": "auto",     # "auto" = picked on episodes of the validation classes, or a number
        "finetune_steps": "auto",  # "auto" or a whole number
        "finetune_lrs": [0.0, 1e-4, 1e-3, 1e-2],    # candidates of "auto" (0 = no fine-tuning)
        "finetune_steps_grid": [10, 25, 50],        # candidates of "auto"
        "finetune_episodes": 5,    # labelled episodes the automatic choice is made on
        "finetune_augment": ["flip", "color", "translation"],
        "finetune_aug_prob": 0.9,
    },
}

# Named evaluation protocols (eval.protocol): each fixes these [eval] keys. BSCD-FSL (Guo et al.
# 2020): 5-way, 1/5/20/50 shots, 15 queries, 600 fixed episodes, on a domain never meta-trained on.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "bscd-fsl": {"ways": [5], "shots": [1, 5, 20, 50], "queries": 15, "episodes": 600},
}

# Sections whose keys belong to a plug-in (a learner, a backbone): checked by the plug-in itself.
OPEN_SECTIONS = ("learner", "model", "data")


def deep_merge(base: dict, update: dict, path: str = "", strict: bool = True) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        where = f"{path}{key}"
        if strict and key not in base and not any(where.startswith(s + ".") for s in OPEN_SECTIONS):
            raise ConfigError(f"unknown config key {where!r}; known keys here: "
                              f"{', '.join(sorted(base)) or '(none)'}")
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = deep_merge(base[key], value, where + ".", strict)
        elif isinstance(base.get(key), dict) and not isinstance(value, dict):
            raise ConfigError(f"config key {where!r} is a section; set one of its keys, e.g. {where}.name=...")
        else:
            out[key] = value
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
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise ConfigError(f"config file {path} is not valid {kind}: {e}") from None


def resolve(file: str | Path | None = None, overrides: list[str] | tuple = (),
            base: dict | None = None) -> dict:
    """Defaults <- plug-in defaults <- ``base`` (e.g. a checkpoint's config) <- file <- overrides.

    Plug-in defaults are those of the chosen data source, backbone and learner: MAML, say,
    brings a meta-batch of 32 tasks, which the file and the overrides can still change.
    """
    from metamap.registry import plugin_defaults  # late: the registry imports the plug-ins
    user: dict = {}
    for layer in [base or {}, load_file(file) if file else {}, *(parse_override(o) for o in overrides)]:
        user = deep_merge(user, layer, strict=False)
    config = deep_merge(DEFAULTS, user)           # strict: catches unknown sections and keys early
    for kind, key in (("data", "name"), ("model", "backbone"), ("learner", "name")):
        plugin = plugin_defaults(kind, config[kind][key])
        config = deep_merge(config, plugin, strict=False)
    config = deep_merge(config, user)
    protocol = config["eval"]["protocol"]
    if protocol:
        if protocol not in PROTOCOLS:
            raise ConfigError(f"unknown eval.protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)} "
                              "(or \"\" for the eval keys as set)")
        config["eval"].update(copy.deepcopy(PROTOCOLS[protocol]))
    validate(config)
    return config


FINETUNE_AUGMENTATIONS = ("flip", "color", "translation")


def finetune_enabled(e: dict) -> bool:
    v = e.get("finetune", False)
    if v in (True, "on", "auto"):
        return True
    if v in (False, "off", None):
        return False
    raise ConfigError(f"eval.finetune must be true or false (or 'auto' / 'off'), not {v!r}")


def check_finetune(e: dict) -> None:
    """Validate the ``eval.finetune*`` keys (test-time fine-tuning, metamap/train/test_time.py)."""
    finetune_enabled(e)
    lr, steps = e["finetune_lr"], e["finetune_steps"]
    if lr != "auto" and not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr >= 0):
        raise ConfigError(f"eval.finetune_lr must be 'auto' or a number >= 0, not {lr!r}")
    if steps != "auto" and not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0):
        raise ConfigError(f"eval.finetune_steps must be 'auto' or a whole number >= 0, not {steps!r}")
    for key, lo in (("finetune_lrs", 0.0), ("finetune_steps_grid", 1)):
        v = e[key]
        if not isinstance(v, list) or not v or any(isinstance(x, bool) or not isinstance(x, (int, float)) or x < lo
                                                   for x in v):
            raise ConfigError(f"eval.{key} must be a non-empty list of numbers >= {lo}, not {v!r}")
    if not isinstance(e["finetune_episodes"], int) or e["finetune_episodes"] < 1:
        raise ConfigError(f"eval.finetune_episodes must be a whole number >= 1, not {e['finetune_episodes']!r}")
    bad = [a for a in e["finetune_augment"] if a not in FINETUNE_AUGMENTATIONS] \
        if isinstance(e["finetune_augment"], list) else [e["finetune_augment"]]
    if bad:
        raise ConfigError(f"eval.finetune_augment: unknown {bad}; choose from {', '.join(FINETUNE_AUGMENTATIONS)}")
    p = e["finetune_aug_prob"]
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 <= p <= 1:
        raise ConfigError(f"eval.finetune_aug_prob must be a number from 0 to 1, not {p!r}")


def validate(config: dict) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)
    def whole(v, low: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    t, e = config["train"], config["eval"]
    check_finetune(e)
    need(whole(config["seed"], 0), f"seed must be a whole number >= 0, not {config['seed']!r}")
    need(whole(e["seed"], 0), f"eval.seed must be a whole number >= 0, not {e['seed']!r}")
    need(whole(t["steps"], 0), f"train.steps must be a whole number >= 0, not {t['steps']!r}")
    for k in ("ways", "shots", "queries", "tasks_per_batch"):
        v = config["episode"][k]
        need(whole(v, 1), f"episode.{k} must be a whole number >= 1, not {v!r}")
    for k in ("ways", "shots"):
        v = e[k] if isinstance(e[k], list) else [e[k]]
        need(all(whole(x, 1) for x in v), f"eval.{k} must be whole numbers >= 1, not {e[k]!r}")
    need(whole(e["episodes"], 1), f"eval.episodes must be a whole number >= 1, not {e['episodes']!r}")
    need(isinstance(e["cache_mb"], (int, float)) and not isinstance(e["cache_mb"], bool) and e["cache_mb"] >= 0,
         f"eval.cache_mb must be a number of megabytes >= 0 (0 = encode per episode), not {e['cache_mb']!r}")
    lr = config["optim"]["lr"]
    need(isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0,
         f"optim.lr must be a positive number, not {lr!r}")
    for k in ("log_every", "checkpoint_every"):
        need(whole(t[k], 1), f"train.{k} must be a whole number >= 1, not {t[k]!r}")
    need(t["precision"] in ("auto", "fp32", "bf16", "fp16"),
         f"train.precision must be auto, fp32, bf16 or fp16, not {t['precision']!r}")
    need(t["prefetch"] in ("auto", True, False), f"train.prefetch must be auto, true or false, not {t['prefetch']!r}")
    growth = t["max_weight_growth"]
    need(isinstance(growth, (int, float)) and not isinstance(growth, bool) and math.isfinite(growth) and growth >= 0,
         f"train.max_weight_growth must be a number >= 0 (0 = no limit), not {growth!r}")
    for k in ("val_every", "max_bad_steps", "threads"):
        need(whole(t[k], 0), f"train.{k} must be a whole number >= 0, not {t[k]!r}")
    need(t["chunk_tasks"] == "auto" or whole(t["chunk_tasks"], 0),
         f"train.chunk_tasks must be auto or a whole number >= 0 (0 = the whole meta-batch), not {t['chunk_tasks']!r}")
    need(t["device"] in ("cpu", "cuda", "auto") or str(t["device"]).startswith("cuda:"),
         f"train.device must be cpu, cuda or auto, not {t['device']!r}")


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
