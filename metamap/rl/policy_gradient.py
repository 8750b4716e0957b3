"""Policy-gradient objectives and the inner adaptation step of MAML for RL.

The inner step is vanilla policy gradient (REINFORCE with a per-task linear feature baseline):
``theta' = theta - alpha * grad L_in(theta)`` with ``L_in = -mean over steps taken of
log pi_theta(a|s) A``, one step per task, all tasks at once (per-task weights carry a leading
task dimension).

**Which estimator of the sampling distribution's dependence** (the support trajectories are
drawn from ``pi_theta``, so the post-update return depends on ``theta`` through them too):

* ``"paper"`` (default, Finn et al. 2017 and the authors' MAML-TRPO): the meta-gradient
  differentiates the query objective through ``theta'(theta)`` only -- the support samples are
  treated as fixed data, and the term ``E[grad log pi_theta(tau_support) * J(theta')]`` is dropped.
  Its inner-step Hessian is the sample Hessian of the REINFORCE loss. This is the estimator the
  float64 hand-unrolled test checks.
* ``"lvc"`` (ProMP's low-variance curvature, Rothfuss et al. 2019): the inner loss is
  ``-mean (pi_theta / stop_grad(pi_theta)) A``, with the same value and first derivative as
  ``"paper"`` but a Hessian that adds ``mean (grad log pi)(grad log pi)^T A`` -- part of the
  sampling-distribution term, at low variance.
"""
from __future__ import annotations

import torch
from torch import Tensor

from metamap.rl.policies import GaussianMLPPolicy, gaussian_kl, gaussian_log_prob
from metamap.rl.trajectories import Episodes

ESTIMATORS = ("paper", "lvc")


def log_probs(policy: GaussianMLPPolicy, params: dict[str, Tensor], episodes: Episodes
              ) -> tuple[Tensor, Tensor, Tensor]:
    """``[T, N*H]`` log-probabilities of the taken actions, with the means and log stds behind them."""
    obs = episodes.obs.flatten(1, 2)
    mean, log_std = policy.distribution(params, obs)
    return gaussian_log_prob(mean, log_std, episodes.actions.flatten(1, 2)), mean, log_std


def masked_task_mean(x: Tensor, mask: Tensor) -> Tensor:
    """``[T, M]`` -> ``[T]``: mean over the steps taken."""
    return (x * mask).sum(1) / mask.sum(1).clamp_min(1)


def inner_losses(policy: GaussianMLPPolicy, params: dict[str, Tensor], episodes: Episodes, adv: Tensor,
                 estimator: str = "paper") -> Tensor:
    """``[T]`` REINFORCE losses (to minimise) of each task's support episodes."""
    logp, _, _ = log_probs(policy, params, episodes)
    weight = logp if estimator == "paper" else torch.exp(logp - logp.detach())
    return -masked_task_mean(weight * adv.flatten(1), episodes.mask.flatten(1))


def expand_per_task(params: dict[str, Tensor], tasks: int, shapes: dict[str, torch.Size]) -> dict[str, Tensor]:
    """Give every parameter a leading task dimension (a view for shared ones)."""
    return {n: p if p.dim() == len(shapes[n]) + 1 else p.expand(tasks, *p.shape) for n, p in params.items()}


def adapt_step(policy: GaussianMLPPolicy, params: dict[str, Tensor], episodes: Episodes, adv: Tensor,
               lr: float, differentiable: bool, second_order: bool = True, estimator: str = "paper"
               ) -> dict[str, Tensor]:
    """One policy-gradient step per task -> per-task parameters ``[T, *shape]``.

    ``differentiable``: keep the graph from ``params`` to the result (for a meta-gradient);
    ``second_order``: also differentiate through the inner gradient (MAML), else treat it as a
    constant (first-order MAML). At evaluation (``differentiable=False``) nothing is kept.
    """
    shapes = {n: p.shape for n, p in policy.named_parameters()}
    with torch.enable_grad():
        start = {}
        for n, p in params.items():
            # A tensor without a graph (evaluation, a line-search candidate) becomes a fresh leaf.
            start[n] = p if differentiable and p.requires_grad else p.detach().requires_grad_()
        current = expand_per_task(start, episodes.num_tasks, shapes)
        loss = inner_losses(policy, current, episodes, adv, estimator).sum()
        names = list(current)
        grads = torch.autograd.grad(loss, [current[n] for n in names],
                                    create_graph=differentiable and second_order)
    new = {n: current[n] - lr * g for n, g in zip(names, grads)}
    return new if differentiable else {n: v.detach() for n, v in new.items()}


def surrogate_and_kl(policy: GaussianMLPPolicy, params: dict[str, Tensor], episodes: Episodes, adv: Tensor,
                     old: tuple[Tensor, Tensor, Tensor], clip: float = 0.0) -> tuple[Tensor, Tensor]:
    """Mean over tasks of the importance-weighted surrogate loss (to minimise) and of ``KL(old || new)``.

    ``old = (log_prob, mean, log_std)`` of the sampling policy on these episodes (detached).
    ``clip > 0`` uses PPO's clipped surrogate.
    """
    logp, mean, log_std = log_probs(policy, params, episodes)
    old_logp, old_mean, old_log_std = old
    ratio = torch.exp(logp - old_logp)
    a = adv.flatten(1)
    gain = ratio * a
    if clip > 0:
        gain = torch.minimum(gain, ratio.clamp(1 - clip, 1 + clip) * a)
    mask = episodes.mask.flatten(1)
    kl = gaussian_kl(old_mean, old_log_std.expand_as(old_mean), mean, log_std.expand_as(mean))
    return -masked_task_mean(gain, mask).mean(), masked_task_mean(kl, mask).mean()
