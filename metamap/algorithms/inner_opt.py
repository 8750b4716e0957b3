"""Inner-loop optimizers: small swappable objects in the shape TorchOpt and Optax give them.

An inner optimizer turns the gradients of a task's support loss into that task's next weights::

    state = opt.init(params)                          # before the first inner step
    params, state = opt.step(params, grads, state, k) # inner step k = 0, 1, ...

``params`` and ``grads`` are dicts ``name -> tensor`` holding the adapted weights, per task
(``[T, *shape]``); a gradient is ``None`` for a weight the loss does not reach (it stays as it
is). ``state`` is a tuple of tensors (empty for the SGD family), so that gradient checkpointing
can carry it through a recomputed step. Every step is a differentiable function of the weights,
the gradients and the optimizer's own parameters: a second-order meta-gradient flows through it.

Learned step sizes are ``nn.Parameter``s of the optimizer, so the outer loop meta-learns them
and checkpoints save them with the rest of the learner:

=====================  ======================================================================
``SGD``                ``w - lr * g`` with one constant step size (MAML, FOMAML, Reptile, ANIL)
``PerLayerPerStepSGD``  a learned scalar per weight tensor and inner step (MAML++'s LSLR)
``PerElementSGD``       a learned step size per weight element, shared by all steps (Meta-SGD)
``Adam``                Adam with bias correction; Reptile's code: ``beta1 = 0``, state carried
=====================  ======================================================================
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from metamap.errors import ConfigError

Params = dict[str, Tensor]
Grads = dict[str, "Tensor | None"]
State = tuple[Tensor, ...]

OPTIMIZERS = ("sgd", "adam")
STEP_SIZE_MODES = ("fixed", "per_layer_per_step", "per_element")
INNER_STATES = ("reset", "carried")


def _key(name: str) -> str:
    return name.replace(".", "__")          # ParameterDict keys may not contain dots


class InnerOptimizer(nn.Module):
    """Base class: ``init`` makes the per-task state, ``step`` takes one inner step."""

    def init(self, params: Params) -> State:
        return ()

    def step(self, params: Params, grads: Grads, state: State, k: int) -> tuple[Params, State]:
        raise NotImplementedError

    def step_size(self, name: str, k: int) -> Tensor | float:
        """The step size that multiplies ``name``'s gradient at step ``k`` (SGD family)."""
        raise NotImplementedError

    def commit(self, names: list[str], state: State) -> None:
        """After a meta-training adaptation: keep what should carry over to the next one (nothing)."""

    def describe(self) -> str:
        return type(self).__name__


class SGD(InnerOptimizer):
    """Plain gradient descent, ``w <- w - lr * g``."""

    def __init__(self, lr: float):
        super().__init__()
        self.lr = float(lr)

    def step_size(self, name: str, k: int) -> Tensor | float:
        return self.lr

    def step(self, params: Params, grads: Grads, state: State, k: int) -> tuple[Params, State]:
        return {n: w if grads[n] is None else w - self.step_size(n, k) * grads[n]
                for n, w in params.items()}, state

    def describe(self) -> str:
        return f"SGD(lr={self.lr:g})"


class PerLayerPerStepSGD(SGD):
    """MAML++'s learned per-layer per-step step sizes (Antoniou et al. 2019, "LSLR").

    A scalar per weight tensor and inner step, initialised to ``lr``; steps beyond the
    trained number (more steps at test time) reuse the last one.
    """

    def __init__(self, shapes: dict[str, torch.Size], lr: float, steps: int):
        super().__init__(lr)
        self.sizes = nn.ParameterDict({_key(n): nn.Parameter(torch.full((max(steps, 1),), self.lr))
                                       for n in shapes})

    def step_size(self, name: str, k: int) -> Tensor:
        lr = self.sizes[_key(name)]
        return lr[min(k, lr.shape[0] - 1)]

    def describe(self) -> str:
        return f"PerLayerPerStepSGD(init={self.lr:g})"


class PerElementSGD(SGD):
    """Meta-SGD's learned step size per weight element (Li et al. 2017), the same at every step."""

    def __init__(self, shapes: dict[str, torch.Size], lr: float):
        super().__init__(lr)
        self.sizes = nn.ParameterDict({_key(n): nn.Parameter(torch.full(tuple(s), self.lr))
                                       for n, s in shapes.items()})

    def step_size(self, name: str, k: int) -> Tensor:
        return self.sizes[_key(name)]

    def describe(self) -> str:
        return f"PerElementSGD(init={self.lr:g})"


class Adam(InnerOptimizer):
    """Adam (Kingma & Ba 2015) with bias correction, per task; state ``(m..., v..., count)``.

    ``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g^2``, ``t <- t + 1``,
    ``w <- w - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``.
    Reptile's code uses ``beta1 = 0`` (no momentum: the first moment is the gradient itself).
    Differentiable, but its square root has an unbounded derivative where a gradient is exactly
    zero, so it is meant for first-order learners (Reptile, FOMAML).

    By default the state starts at zero for every task. ``carried`` (the shapes of the adapted
    weights) keeps it across tasks instead, as Reptile's code does (its Adam slots are not among
    the variables reset after each task): every adaptation starts from the moments and step
    count in the buffers, and :meth:`commit` (called after each meta-training adaptation) stores
    the state the tasks ended with -- their mean over a chunk of several tasks, the exact
    sequential recipe with ``train.chunk_tasks = 1``. Evaluation starts from the buffers and
    leaves them alone. The buffers are checkpointed with the learner.
    """

    def __init__(self, lr: float, beta1: float = 0.0, beta2: float = 0.999, eps: float = 1e-8,
                 carried: dict[str, torch.Size] | None = None):
        super().__init__()
        for what, b in (("inner_beta1", beta1), ("inner_beta2", beta2)):
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < 1:
                raise ConfigError(f"learner.{what} must be a number in [0, 1), not {b!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ConfigError(f"learner.inner_eps must be a positive number, not {eps!r}")
        self.lr, self.beta1, self.beta2, self.eps = float(lr), float(beta1), float(beta2), float(eps)
        self.carried = carried is not None
        if self.carried:
            for n, shape in carried.items():
                self.register_buffer("m__" + _key(n), torch.zeros(shape))
                self.register_buffer("v__" + _key(n), torch.zeros(shape))
            self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def init(self, params: Params) -> State:
        if not self.carried:
            zeros = tuple(torch.zeros_like(w) for w in params.values())
            return zeros + tuple(torch.zeros_like(w) for w in params.values()) + (torch.zeros((), dtype=torch.long),)
        m = tuple(getattr(self, "m__" + _key(n)).to(w.dtype).expand_as(w) for n, w in params.items())
        v = tuple(getattr(self, "v__" + _key(n)).to(w.dtype).expand_as(w) for n, w in params.items())
        return m + v + (self.count.clone(),)

    def step(self, params: Params, grads: Grads, state: State, k: int) -> tuple[Params, State]:
        n = len(params)
        m, v, count = list(state[:n]), list(state[n:2 * n]), state[2 * n] + 1
        out = {}
        t = int(count)
        c1, c2 = 1 - self.beta1 ** t, 1 - self.beta2 ** t
        for i, (name, w) in enumerate(params.items()):
            g = grads[name]
            if g is None:
                out[name] = w
                continue
            m[i] = self.beta1 * m[i] + (1 - self.beta1) * g
            v[i] = self.beta2 * v[i] + (1 - self.beta2) * g * g
            out[name] = w - self.lr * (m[i] / c1) / ((v[i] / c2).sqrt() + self.eps)
        return out, tuple(m) + tuple(v) + (count,)

    def commit(self, names: list[str], state: State) -> None:
        """Keep the state a meta-training adaptation ended with (``carried`` only; mean over tasks)."""
        if not self.carried:
            return
        n = len(names)
        with torch.no_grad():
            for name, m, v in zip(names, state[:n], state[n:2 * n]):
                getattr(self, "m__" + _key(name)).copy_(m.detach().mean(0))      # [T, *shape] -> [*shape]
                getattr(self, "v__" + _key(name)).copy_(v.detach().mean(0))
            self.count.copy_(state[2 * n])

    def describe(self) -> str:
        return (f"Adam(lr={self.lr:g}, betas=({self.beta1:g}, {self.beta2:g}), eps={self.eps:g}"
                f"{', carried' if self.carried else ''})")


def build_inner_optimizer(name: str, step_sizes: str, lr: float, shapes: dict[str, torch.Size],
                          steps: int, beta1: float = 0.0, beta2: float = 0.999, eps: float = 1e-8,
                          state: str = "reset") -> InnerOptimizer:
    """The optimizer the options ``learner.inner_optimizer``, ``learner.step_sizes`` and
    ``learner.inner_state`` name.

    ``shapes``: the adapted weights' shapes (for learned step sizes and carried state);
    ``steps``: inner steps in meta-training (one learned step size per step for
    ``per_layer_per_step``).
    """
    if state not in INNER_STATES:
        raise ConfigError(f"learner.inner_state must be one of {', '.join(INNER_STATES)}, not {state!r}")
    if state == "carried" and name != "adam":
        raise ConfigError("learner.inner_state = \"carried\" keeps Adam's moments across tasks; "
                          "it needs learner.inner_optimizer = \"adam\" (SGD has no state): with SGD set "
                          "learner.inner_state = \"reset\"")
    if name not in OPTIMIZERS:
        raise ConfigError(f"learner.inner_optimizer must be one of {', '.join(OPTIMIZERS)}, not {name!r}")
    if step_sizes not in STEP_SIZE_MODES:
        raise ConfigError(f"learner.step_sizes must be one of {', '.join(STEP_SIZE_MODES)}, not {step_sizes!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
        raise ConfigError(f"learner.inner_lr must be a number, not {lr!r}")
    if name == "adam":
        if step_sizes != "fixed":
            raise ConfigError(f"learner.step_sizes = {step_sizes!r} learns SGD step sizes; with "
                              "learner.inner_optimizer = \"adam\" leave step_sizes at \"fixed\"")
        return Adam(lr, beta1, beta2, eps, carried=shapes if state == "carried" else None)
    if step_sizes == "per_layer_per_step":
        return PerLayerPerStepSGD(shapes, lr, steps)
    if step_sizes == "per_element":
        return PerElementSGD(shapes, lr)
    return SGD(lr)
