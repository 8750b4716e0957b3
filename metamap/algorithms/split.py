"""Which weights of a network adapt to each task, which only the outer loop learns, which stay fixed.

A gradient-based learner declares this split once, from its options, and everything else reads
it: the inner loop adapts ``adapted``, the outer optimizer learns ``adapted`` and ``meta``
(the initial values of the adapted weights and the shared ones), and ``frozen`` weights are
used as they are. Names are the network's parameter names; a selection names parameters or
whole modules (``"head"`` selects ``head.weight`` and ``head.bias``).

A weight whose ``requires_grad`` is off is frozen unless a selection adapts it explicitly:
then every task adapts it from the same fixed starting value, which the outer loop leaves alone.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from metamap.errors import ConfigError


def _under(name: str, path: str) -> bool:
    return path == "" or name == path or name.startswith(path + ".")


@dataclass(frozen=True)
class ParameterSplit:
    adapted: tuple[str, ...]
    meta: tuple[str, ...]
    frozen: tuple[str, ...]

    @classmethod
    def declare(cls, model: nn.Module, adapt: str | list = "all", freeze: list | tuple = ()) -> ParameterSplit:
        """``adapt``: ``"all"`` (every trainable weight), ``"head"`` (the module named ``head``) or a
        list of parameter / module names; ``freeze``: names of weights that neither adapt nor learn."""
        params = dict(model.named_parameters())
        frozen_sel = _select(params, _as_list(freeze, "learner.freeze"), "learner.freeze")
        trainable = [n for n, p in params.items() if p.requires_grad and n not in frozen_sel]
        if adapt == "all":
            adapted = trainable
        elif adapt == "head":
            adapted = [n for n in trainable if _under(n, "head")]
        else:
            chosen = _select(params, _as_list(adapt, "learner.adapt"), "learner.adapt")
            clash = sorted(set(chosen) & set(frozen_sel))
            if clash:
                raise ConfigError(f"learner.adapt and learner.freeze both name {', '.join(clash)}; "
                                  "a weight either adapts or is frozen")
            adapted = chosen
        meta = [n for n in trainable if n not in adapted]
        frozen = [n for n in params if n not in adapted and n not in meta]
        return cls(tuple(adapted), tuple(meta), tuple(frozen))

    def adapts(self, module: str = "") -> bool:
        """Whether any weight of ``module`` (a module path; ``""`` = the whole network) adapts."""
        return any(_under(n, module) for n in self.adapted)

    def within(self, module: str) -> ParameterSplit:
        """The split restricted to the weights under ``module`` (names unchanged)."""
        keep = lambda names: tuple(n for n in names if _under(n, module))
        return ParameterSplit(keep(self.adapted), keep(self.meta), keep(self.frozen))


def _as_list(value, key: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(a, str) for a in value):
        raise ConfigError(f"{key} must be 'all', 'head' or a list of parameter or module names, not {value!r}")
    return list(value)


def _select(params: dict, names: list[str], key: str) -> list[str]:
    missing = [a for a in names if not any(_under(n, a) for n in params)]
    if missing:
        raise ConfigError(f"{key}: no parameter named {', '.join(missing)}; parameters are: {', '.join(params)}")
    return [n for n in params if any(_under(n, a) for a in names)]
