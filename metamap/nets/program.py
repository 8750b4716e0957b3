"""The fast backend's intermediate form: a network lowered to a list of operations.

``lower(module)`` turns a network into :class:`Op`\\ s that name the parameters they read (by
their dotted names in the root module), or returns ``None`` when the network holds a module it
cannot lower (the reference backend then runs it). Standard layers lower here; a backbone
declares its own lowering with a method ``lower(self, prefix) -> list[Op] | None`` (Conv-4,
MLP and ResNet-12 do), typically by lowering its children and adding what its ``forward`` does
between them. Rewrite passes (:mod:`metamap.nets.passes`) then replace runs of operations by
faster fused ones, and the executor (:mod:`metamap.nets.functional`) runs the result.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class Op:
    """One operation. ``kind`` names it: ``conv``, ``bn``, ``relu``, ``leaky_relu``, ``maxpool``,
    ``linear``, ``flatten``, ``mean_hw`` (average over height and width), ``add`` (the sum of two
    branches run on the same input: ``branches``), or a fused kind made by a rewrite pass, whose
    ``parts`` are the operations it replaces (run instead whenever the fused form does not apply)."""

    kind: str
    module: nn.Module | None = None
    weight: str | None = None          # parameter names in the root module
    bias: str | None = None
    prefix: str = ""                   # the module's name (batch-norm statistics are recorded under it)
    extra: dict = field(default_factory=dict)
    parts: list[Op] = field(default_factory=list)
    branches: tuple[list[Op], ...] = ()

    def params(self) -> list[str]:
        """Every parameter name this operation reads, its parts and branches included."""
        own = [n for n in (self.weight, self.bias) if n]
        nested = [n for op in self.parts for n in op.params()]
        nested += [n for branch in self.branches for op in branch for n in op.params()]
        return own + [n for n in nested if n not in own]


def _named(module: nn.Module, p: str, attr: str) -> str | None:
    return p + attr if getattr(module, attr, None) is not None else None


def lower(module: nn.Module, prefix: str = "") -> list[Op] | None:
    """``module`` as operations, or ``None`` if any part of it cannot be lowered."""
    p = f"{prefix}." if prefix else ""
    declared = getattr(module, "lower", None)
    if callable(declared):
        return declared(prefix)
    if isinstance(module, nn.Sequential):
        out: list[Op] = []
        for name, child in module.named_children():
            sub = lower(child, p + name)
            if sub is None:
                return None
            out += sub
        return out
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            return None
        return [Op("conv", module, _named(module, p, "weight"), _named(module, p, "bias"), prefix)]
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return [Op("bn", module, _named(module, p, "weight"), _named(module, p, "bias"), prefix)]
    if isinstance(module, nn.Linear):
        return [Op("linear", module, _named(module, p, "weight"), _named(module, p, "bias"), prefix)]
    if isinstance(module, nn.ReLU):
        return [Op("relu")]
    if isinstance(module, nn.LeakyReLU):
        return [Op("leaky_relu", extra={"slope": module.negative_slope})]
    if isinstance(module, nn.MaxPool2d):
        return [Op("maxpool", module)]
    if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
        return [Op("flatten")]
    if isinstance(module, nn.Identity):
        return []
    return None


def lower_children(prefix: str, *named: tuple[str, nn.Module]) -> list[Op] | None:
    """The operations of several children, in order (``None`` if one cannot be lowered)."""
    p = f"{prefix}." if prefix else ""
    out: list[Op] = []
    for name, child in named:
        sub = lower(child, p + name)
        if sub is None:
            return None
        out += sub
    return out
