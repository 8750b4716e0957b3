"""Which ``--set`` overrides ``metamap eval`` may apply to a trained learner.

An override that changes how a learner *adapts* (inner steps, step size, inner optimizer,
batch-norm mode, transduction, the fine-tuning head's steps...) is applied: the learner is
rebuilt with it around the checkpoint's weights. One that would change the trained model
itself (its architecture, its loss, anything that only shapes meta-training) is refused with a
message, since the weights were learned for the other value.
"""
from __future__ import annotations

from metamap.errors import ConfigError

# [learner] keys that only change adaptation at test time, for every learner that has them.
ADAPTATION_KEYS = frozenset({
    "inner_steps_eval", "inner_batch_eval", "inner_lr", "inner_optimizer", "inner_beta1", "inner_beta2",
    "inner_eps", "bn", "transductive",                                   # gradient-based learners
    "steps", "lr", "finetune_backbone", "backbone_lr",                   # the fine-tuning baseline's head
})
# [learner] keys that change the speed, never the function (tested equal elsewhere).
RUNTIME_KEYS = frozenset({"backend", "batched", "channels_last", "fuse_bn_pool", "fold_bn", "cpp_kernels",
                          "grad_checkpoint"})


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
    for (sec, k), (old, new) in changed.items():
        if sec == "model":
            raise ConfigError(f"--set model.{k}={new!r} would change the network of this checkpoint (trained "
                              f"with model.{k} = {old!r}); eval cannot change the architecture. Train a new "
                              "model instead")
        if k not in ADAPTATION_KEYS | RUNTIME_KEYS:
            allowed = ", ".join(f"learner.{a}" for a in sorted(ADAPTATION_KEYS) if a in trained.get("learner", {}))
            raise ConfigError(f"--set learner.{k}={new!r}: this checkpoint was trained with learner.{k} = {old!r}, "
                              "and that key shapes the trained model (its architecture, loss or meta-training), "
                              f"not how it adapts; eval can change only {allowed}")
    return {k: v for (sec, k), v in changed.items()}
