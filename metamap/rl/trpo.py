"""Trust-region policy optimisation (Schulman et al. 2015) on a list of parameter tensors.

One step: the surrogate's gradient ``g``, the natural direction ``s ~ F^{-1} g`` by conjugate
gradient with Hessian-vector products of the mean KL (``F`` is that Hessian, plus ``damping``),
the largest step ``sqrt(2 delta / s^T F s) s`` of the quadratic model, then a backtracking line
search (ratio 0.8, at most 15 tries) that keeps the first candidate whose surrogate improves and
whose KL is at most ``delta`` -- rllab's ``ConjugateGradientOptimizer`` defaults (10 CG
iterations, damping 1e-5), which the authors' MAML-TRPO used with ``delta = 0.01``.

The objectives are functions of the parameter list, so for MAML they include the inner
adaptation: the Hessian-vector products differentiate through the inner policy-gradient step.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Objective = Callable[[list[Tensor]], Tensor]


def flat(tensors) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector: Tensor, like: list[Tensor]) -> list[Tensor]:
    out, i = [], 0
    for t in like:
        out.append(vector[i:i + t.numel()].view_as(t))
        i += t.numel()
    return out


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, iterations: int = 10,
                       tolerance: float = 1e-10) -> Tensor:
    """Approximately solve ``A x = b`` for a symmetric positive definite ``A`` given as ``matvec``."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = r @ r
    for _ in range(iterations):
        ap = matvec(p)
        alpha = rr / (p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        new_rr = r @ r
        if new_rr < tolerance:
            break
        p = r + (new_rr / rr) * p
        rr = new_rr
    return x


def kl_hvp(kl: Objective, params: list[Tensor], damping: float) -> Callable[[Tensor], Tensor]:
    """``v -> (d^2 KL / d params^2) v + damping v`` at ``params``, exact, by double backward.

    (Finn et al. 2017 used finite differences of the KL gradient to avoid third derivatives
    through the inner step; in float32 those were too inexact here, so we differentiate twice.)
    """
    leaves = [p.detach().requires_grad_() for p in params]
    g = flat(torch.autograd.grad(kl(leaves), leaves, create_graph=True))

    def matvec(v: Tensor) -> Tensor:
        hv = torch.autograd.grad(g @ v, leaves, retain_graph=True)
        return flat(hv) + damping * v
    return matvec


@dataclass
class TRPOStats:
    loss_before: float
    loss_after: float
    kl: float
    step_fraction: float      # 0 when the line search rejected every candidate
    grad_norm: float


def trpo_step(loss: Objective, kl: Objective, params: list[Tensor], max_kl: float = 0.01,
              cg_iterations: int = 10, damping: float = 1e-5, backtrack_ratio: float = 0.8,
              max_backtracks: int = 15, curvature_kl: Objective | None = None
              ) -> tuple[list[Tensor], TRPOStats]:
    """New parameter values (detached) after one TRPO step; ``params`` are not modified.

    ``loss(params)`` is the surrogate to *minimise* (minus the importance-weighted advantage),
    ``kl(params)`` the mean KL between the sampling policy and the policy at ``params``;
    ``curvature_kl`` (default ``kl``) is the one whose Hessian defines the trust region's metric
    (a KL on a subsample of the data makes the conjugate-gradient steps cheaper).
    """
    current = [p.detach() for p in params]
    leaves = [p.clone().requires_grad_() for p in current]
    loss0 = loss(leaves)
    g = flat(torch.autograd.grad(loss0, leaves))
    loss0 = float(loss0.detach())
    stats = TRPOStats(loss0, loss0, 0.0, 0.0, float(g.norm()))
    if not bool(torch.isfinite(g).all()) or float(g.norm()) == 0.0:
        return current, stats
    fvp = kl_hvp(curvature_kl or kl, current, damping)
    direction = conjugate_gradient(fvp, -g, cg_iterations)
    shs = float(direction @ fvp(direction))
    if not shs > 0:
        return current, stats
    full = direction * (2 * max_kl / shs) ** 0.5
    theta = flat(current)
    # No no_grad() here: for MAML the objectives take an inner gradient step themselves.
    for k in range(max_backtracks):
        fraction = backtrack_ratio ** k
        candidate = unflat(theta + fraction * full, current)
        new_loss, new_kl = float(loss(candidate)), float(kl(candidate))
        if new_loss < loss0 and new_kl <= max_kl:
            return [c.clone() for c in candidate], TRPOStats(loss0, new_loss, new_kl, fraction, stats.grad_norm)
    return current, stats
