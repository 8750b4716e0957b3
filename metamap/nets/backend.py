"""One contract for running a network with *per-task* weights, and its two backends.

A backend runs ``model`` (or its sub-module ``part``) on a batch of tasks::

    out = backend(params, x, training, record=None)      # x [T, N, *example] -> [T, N, *out]

``params`` maps the parameter names of ``model`` (``"body.features.0.0.weight"``, whatever
``part`` runs) to tensors that are either shared by all tasks (the parameter's own shape) or
per task (an extra leading ``T``). ``training`` and the batch-norm mode decide the statistics:
``"transductive"`` normalises every task's examples with their own batch statistics, always;
``"running"`` does so in training and uses the module's running statistics otherwise. Running
statistics are never changed here: with ``record`` (a dict) the backend reports each batch-norm
layer's batch mean and unbiased variance, averaged over tasks, under the layer's module name,
and the learner updates its running statistics from them.

* :class:`ReferenceBackend` is ``torch.func.functional_call`` once per task: any ``nn.Module``.
* :class:`FastBackend` runs all tasks at once (grouped convolutions, batched matmuls) from the
  network lowered to operations (:mod:`metamap.nets.program`), rewritten by the passes whose
  levers are on (:mod:`metamap.nets.passes`) and run by a plain executor
  (:mod:`metamap.nets.functional`). It computes the same function as the reference backend,
  outputs, gradients of any order and recorded statistics alike (tests/test_backends.py).

:func:`make_backend` picks one from :class:`BackendOptions` (``learner.backend = "fast"`` falls
back to the reference backend for a network that does not lower).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metamap.errors import ConfigError
from metamap.nets.functional import BN_MODES, execute
from metamap.nets.passes import kinds, rewrite
from metamap.nets.program import Op, lower

BACKENDS = ("fast", "reference")


@dataclass(frozen=True)
class BackendOptions:
    """The ``learner.*`` keys that choose a backend and its levers (each keeps the function)."""

    backend: str = "fast"           # fast | reference
    channels_last: bool = True      # grouped activations in channels-last memory (faster on CPU)
    fuse_bn_pool: bool = True       # pass FuseBnReluPool
    fold_bn: bool = True            # pass FoldBatchNorm
    cpp_kernels: bool = True        # pass CppFirstLayer

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ConfigError(f"learner.backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")

    def levers(self) -> dict[str, bool]:
        return {"fuse_bn_pool": self.fuse_bn_pool, "fold_bn": self.fold_bn, "cpp_kernels": self.cpp_kernels}


class Backend:
    """Base class: the module to run, its parameters' names and the batch-norm mode."""

    name: ClassVar[str] = ""

    def __init__(self, model: nn.Module, part: str = "", bn_mode: str = "transductive"):
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {BN_MODES}, not {bn_mode!r}")
        self.module, self.part, self.bn_mode = model.get_submodule(part), part, bn_mode
        self.prefix = part + "." if part else ""
        self.shapes = {self.prefix + n: p.shape for n, p in self.module.named_parameters()}

    def __call__(self, params: dict[str, Tensor], x: Tensor, training: bool, record: dict | None = None) -> Tensor:
        return self.run(params, x, self.bn_mode == "running" and not training, record)

    def run(self, params: dict[str, Tensor], x: Tensor, use_running_stats: bool, record: dict | None) -> Tensor:
        raise NotImplementedError


class ReferenceBackend(Backend):
    """One ``functional_call`` per task: the definition every other backend must match.

    Batch-norm layers see the module in train mode (batch statistics) unless running statistics
    are asked for; the running buffers are passed as copies, so running the network never
    changes the module, and the batch statistics are recorded by forward hooks.
    """

    name = "reference"

    def run(self, params, x, use_running_stats, record):
        buffers = {n: b.clone() for n, b in self.module.named_buffers()}
        own = {n[len(self.prefix):]: v for n, v in params.items() if n in self.shapes}
        stats: dict[str, list] = {}
        hooks = []
        if record is not None and not use_running_stats:
            for name, m in self.module.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    hooks.append(m.register_forward_pre_hook(partial(_capture, stats, self.prefix + name)))
        was = self.module.training
        self.module.train(not use_running_stats)
        try:
            outs = []
            for t in range(x.shape[0]):
                p = {n: (v[t] if v.dim() == len(self.shapes[self.prefix + n]) + 1 else v) for n, v in own.items()}
                outs.append(functional_call(self.module, {**buffers, **p}, (x[t],)))
        finally:
            self.module.train(was)
            for h in hooks:
                h.remove()
        for name, per_task in stats.items():
            means, variances = zip(*per_task)
            record[name] = (torch.stack(means).mean(0),
                            None if variances[0] is None else torch.stack(variances).mean(0))
        return torch.stack(outs)


def _capture(stats: dict, name: str, module: nn.Module, inputs: tuple) -> None:
    with torch.no_grad():
        x = inputs[0]
        dims = (0,) + tuple(range(2, x.dim()))
        count = x.numel() // x.shape[1]
        stats.setdefault(name, []).append((x.mean(dims), x.var(dims, correction=1) if count > 1 else None))


class FastBackend(Backend):
    """All tasks at once, from the lowered and rewritten network ``program``."""

    name = "fast"

    def __init__(self, model: nn.Module, program: list[Op], part: str = "", bn_mode: str = "transductive",
                 options: BackendOptions | None = None):
        super().__init__(model, part, bn_mode)
        self.options = options = options or BackendOptions()
        self.program = rewrite(program, options.levers())
        self.dims = {n: len(s) for n, s in self.shapes.items()}

    def run(self, params, x, use_running_stats, record):
        return execute(self.program, params, x, self.dims, use_running_stats, self.options.channels_last, record)

    def kinds(self) -> list[str]:
        """The operation kinds of the rewritten program, in order (branches included)."""
        return kinds(self.program)


def make_backend(model: nn.Module, part: str = "", bn_mode: str = "transductive",
                 options: BackendOptions | None = None) -> Backend:
    """The backend ``options`` asks for (default: fast, every lever on), running ``model``'s sub-module ``part``."""
    options = options or BackendOptions()
    if options.backend == "fast":
        program = lower(model.get_submodule(part), part)
        if program is not None:
            return FastBackend(model, program, part, bn_mode, options)
    return ReferenceBackend(model, part, bn_mode)
