"""Which ``--set`` overrides ``metamap eval`` may apply to a trained learner.

An override that changes how a learner *adapts* (inner steps, step size, inner optimizer,
batch-norm mode, transduction, the fine-tuning head's steps...) is applied: the learner is
rebuilt with it around the checkpoint's weights. One that would change the trained model
itself (its architecture, its loss, anything that only shapes meta-training) is refused with a
message, since the weights were learned for the other value.

Which is which comes from the learner's options schema: the fields whose role is
``adaptation`` or ``runtime`` (see :mod:`metamap.options`).
"""
from __future__ import annotations

from metamap.errors import ConfigError
from metamap.options import ADAPTATION, RUNTIME, roles
from metamap.registry import plugin, plugins


def allowed_keys(learner: str | None = None) -> frozenset[str]:
    """The ``[learner]`` keys eval may change: those of role adaptation or runtime in the options of
    ``learner`` (of every registered learner when ``None``)."""
    found = [plugin("learner", learner)] if learner is not None else list(plugins("learner").values())
    return frozenset(k for p in found if p.options is not None
                     for k, role in roles(p.options).items() if role in (ADAPTATION, RUNTIME))


def requested(overrides) -> set[tuple[str, str]]:
    """``(section, key)`` of each ``section.key=value`` override (only the first two levels)."""
    out = set()
    for item in overrides:
        parts = item.split("=", 1)[0].strip().split(".")
        if len(parts) >= 2:
            out.add((parts[0], parts[1]))
    return out


def check(trained: dict, now: dict, overrides=None) -> dict[str, tuple]:
    """The learner keys that the overrides (all of them when ``None``) change relative to the
    ``trained`` config, all of them allowed; raises :class:`ConfigError` for a change to the model or
    to a learner key that shapes the trained model."""
    asked = requested(overrides) if overrides is not None else \
        {(sec, k) for sec in ("model", "learner") for k in set(trained.get(sec, {})) | set(now.get(sec, {}))}
    changed = {(sec, k): (trained.get(sec, {}).get(k), now.get(sec, {}).get(k)) for sec, k in sorted(asked)
               if sec in ("model", "learner") and trained.get(sec, {}).get(k) != now.get(sec, {}).get(k)}
    allowed = allowed_keys(now.get("learner", {}).get("name"))
    for (sec, k), (old, new) in changed.items():
        if sec == "model":
            raise ConfigError(f"--set model.{k}={new!r} would change the network of this checkpoint (trained "
                              f"with model.{k} = {old!r}); eval cannot change the architecture. Train a new "
                              "model instead")
        if k not in allowed:
            can = ", ".join(f"learner.{a}" for a in sorted(allowed) if a in trained.get("learner", {}))
            raise ConfigError(f"--set learner.{k}={new!r}: this checkpoint was trained with learner.{k} = {old!r}, "
                              "and that key shapes the trained model (its architecture, loss or meta-training), "
                              f"not how it adapts; eval can change only {can}")
    return {k: v for (sec, k), v in changed.items()}
