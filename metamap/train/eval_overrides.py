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


def changed_keys(trained: dict, now: dict, section: str) -> dict[str, tuple]:
    """``key -> (trained value, new value)`` for the keys of ``section`` that differ."""
    a, b = trained.get(section, {}), now.get(section, {})
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check(trained: dict, now: dict) -> dict[str, tuple]:
    """The learner keys ``now`` changes relative to the ``trained`` config, all of them allowed;
    raises :class:`ConfigError` for a change to the model or to a training-only learner key."""
    model = changed_keys(trained, now, "model")
    if model:
        k, (old, new) = next(iter(model.items()))
        raise ConfigError(f"--set model.{k}={new!r} would change the network of this checkpoint (trained with "
                          f"model.{k} = {old!r}); eval cannot change the architecture. Train a new model instead")
    learner = changed_keys(trained, now, "learner")
    refused = [k for k in learner if k not in ADAPTATION_KEYS | RUNTIME_KEYS]
    if refused:
        k = refused[0]
        old, new = learner[k]
        raise ConfigError(f"--set learner.{k}={new!r}: this checkpoint was trained with learner.{k} = {old!r}, and "
                          "that key shapes the trained model (its architecture, loss or meta-training), not how it "
                          "adapts; eval can change only " + ", ".join(f"learner.{a}" for a in sorted(ADAPTATION_KEYS)
                                                                     if a in trained.get("learner", {})))
    return learner
