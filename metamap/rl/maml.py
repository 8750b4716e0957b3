"""MAML for reinforcement learning (Finn et al. 2017, section 5.3), first-order MAML, and the
policy-gradient baselines (pre-trained, random initialisation, oracle), as pure steps.

One meta-iteration on tasks ``T``:

1. support: ``trajectories`` episodes per task with the current policy ``theta``;
   advantages from a per-task linear baseline; one vanilla policy-gradient step per task,
   ``theta'_t = theta - alpha grad L_in`` (``inner_steps`` times, sampling anew after each);
2. query: ``trajectories`` episodes per task with ``theta'_t``;
3. outer step on ``theta`` through ``theta'(theta)``: TRPO on the importance-weighted surrogate of
   the query episodes, with the KL between the sampling and the new post-update policies as
   the trust region (the authors' MAML-TRPO), or ``outer = "ppo"``: Adam steps on the clipped
   surrogate (ProMP-style, with ``estimator = "lvc"``).

``inner_steps = 0`` is plain TRPO on all tasks jointly: the pre-trained baseline, and with an
oracle task family (goal in the observation) the oracle.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from metamap.rl.envs import TaskFamily
from metamap.rl.policies import GaussianMLPPolicy, gaussian_entropy
from metamap.rl.policy_gradient import adapt_step, log_probs, surrogate_and_kl
from metamap.rl.trajectories import Episodes, advantages, rollout
from metamap.rl.trpo import TRPOStats, trpo_step


def stream(seed: int, split: str, index: int, position: int, phase: int) -> list[int]:
    """Integers seeding one task's rollouts of one phase (support step ``k`` or query)."""
    return [int(seed), zlib.crc32(split.encode()), int(index), int(position), int(phase)]


@dataclass
class PGConfig:
    """Options of the policy-gradient meta-learners (defaults: the authors' 2-D navigation code)."""

    inner_steps: int = 1
    inner_lr: float = 0.1
    eval_lr_factor: float = 0.5        # step size alpha for the first adaptation step, then this x alpha
    first_order: bool = False
    estimator: str = "paper"
    trajectories: int = 20
    discount: float = 0.99
    gae_lambda: float = 1.0
    normalize_advantages: bool = True
    outer: str = "trpo"                # trpo | ppo
    max_kl: float = 0.01
    cg_iterations: int = 10
    cg_damping: float = 1e-5
    backtrack_ratio: float = 0.8
    max_backtracks: int = 15
    curvature_tasks: float = 1.0       # fraction of the meta-batch's tasks whose KL gives TRPO's metric
    ppo_clip: float = 0.2
    ppo_epochs: int = 5


@dataclass
class MetaBatch:
    """Everything one meta-iteration sampled: per inner step the support episodes and advantages,
    the query episodes and advantages, and the sampling policy's log-probs on the query."""

    support: list[tuple[Episodes, Tensor]]
    query: Episodes
    query_adv: Tensor
    old: tuple[Tensor, Tensor, Tensor]
    stats: dict = field(default_factory=dict)

    def first(self, n: int) -> MetaBatch:
        """The first ``n`` tasks (tasks are drawn independently, so these are a random subsample)."""
        return MetaBatch([(e.slice(0, n), a[:n]) for e, a in self.support], self.query.slice(0, n),
                         self.query_adv[:n], tuple(t[:n] for t in self.old), self.stats)


class PolicyGradientMeta:
    """The steps of MAML-RL on one policy and one task family; a learner wraps it."""

    def __init__(self, policy: GaussianMLPPolicy, family: TaskFamily, cfg: PGConfig):
        self.policy, self.family, self.cfg = policy, family, cfg
        self.names = [n for n, _ in policy.named_parameters()]

    def theta(self) -> dict[str, Tensor]:
        return dict(self.policy.named_parameters())

    def sample(self, params: dict[str, Tensor], tasks: np.ndarray, seeds: list[list[int]],
               trajectories: int | None = None) -> Episodes:
        detached = {n: p.detach() for n, p in params.items()}
        return rollout(self.family, lambda obs: self.policy.distribution(detached, obs), tasks,
                       trajectories or self.cfg.trajectories, seeds, dtype=self.dtype)

    @property
    def dtype(self):
        return self.policy.log_std.dtype

    def advantages(self, episodes: Episodes) -> Tensor:
        c = self.cfg
        return advantages(episodes, c.discount, c.gae_lambda, c.normalize_advantages)

    def adapt(self, params, support: list[tuple[Episodes, Tensor]], differentiable: bool,
              lrs: list[float] | None = None):
        for k, (episodes, adv) in enumerate(support):
            lr = self.cfg.inner_lr if lrs is None else lrs[k]
            params = adapt_step(self.policy, params, episodes, adv, lr, differentiable,
                                not self.cfg.first_order, self.cfg.estimator)
        return params

    # -- one meta-iteration ------------------------------------------------------------------------
    def collect(self, tasks: np.ndarray, seeds) -> MetaBatch:
        """Sample support and query episodes; ``seeds(phase) -> per-task seed lists``."""
        params = {n: p.detach() for n, p in self.theta().items()}
        support = []
        for k in range(self.cfg.inner_steps):
            episodes = self.sample(params, tasks, seeds(k))
            adv = self.advantages(episodes)
            support.append((episodes, adv))
            params = adapt_step(self.policy, params, episodes, adv, self.cfg.inner_lr, False)
        query = self.sample(params, tasks, seeds(self.cfg.inner_steps))
        with torch.no_grad():
            old = tuple(t.detach() for t in log_probs(self.policy, params, query))
        stats = {"return_pre": float(support[0][0].returns().mean()) if support else float(query.returns().mean()),
                 "return": float(query.returns().mean()),
                 "env_steps": sum(e.steps for e, _ in support) + query.steps}
        return MetaBatch(support, query, self.advantages(query), old, stats)

    def objectives(self, batch: MetaBatch, clip: float = 0.0, tasks: int | None = None):
        """``(loss(params list), kl(params list))`` of the post-update policy, through the inner steps
        (on the first ``tasks`` tasks of the batch only, if given)."""
        if tasks is not None:
            batch = batch.first(tasks)

        def both(values: list[Tensor]) -> tuple[Tensor, Tensor]:
            # Line-search candidates need values only: no graph through the inner step then.
            graph = any(v.requires_grad for v in values)
            params = self.adapt(dict(zip(self.names, values)), batch.support, differentiable=graph)
            return surrogate_and_kl(self.policy, params, batch.query, batch.query_adv, batch.old, clip)
        return (lambda v: both(v)[0]), (lambda v: both(v)[1])

    def trpo_update(self, batch: MetaBatch) -> TRPOStats:
        """One TRPO step; writes the new values into the policy."""
        c = self.cfg
        loss, kl = self.objectives(batch)
        n = batch.query.num_tasks
        few = max(1, round(c.curvature_tasks * n))
        curvature = self.objectives(batch, tasks=few)[1] if few < n else None
        params = [p for _, p in self.policy.named_parameters()]
        new, stats = trpo_step(loss, kl, params, c.max_kl, c.cg_iterations, c.cg_damping, c.backtrack_ratio,
                               c.max_backtracks, curvature)
        with torch.no_grad():
            for p, v in zip(params, new):
                p.copy_(v)
        return stats

    def entropy(self) -> float:
        return float(gaussian_entropy(self.policy.log_std.detach()))

    # -- evaluation ------------------------------------------------------------------------------
    def adaptation_returns(self, tasks: np.ndarray, seeds, steps: int, trajectories: int) -> Tensor:
        """``[steps + 1, T]`` mean return per task after ``0..steps`` policy-gradient steps.

        Step ``k``'s episodes measure the ``k``-step policy and are the support of step ``k + 1``.
        Step sizes: ``inner_lr``, then ``eval_lr_factor * inner_lr`` (Finn et al., appendix A.2).
        """
        c = self.cfg
        params = {n: p.detach() for n, p in self.theta().items()}
        out = []
        for k in range(steps + 1):
            episodes = self.sample(params, tasks, seeds(k), trajectories)
            out.append(episodes.returns().mean(1))
            if k < steps:
                lr = c.inner_lr if k == 0 else c.inner_lr * c.eval_lr_factor
                params = adapt_step(self.policy, params, episodes, self.advantages(episodes), lr, False)
        return torch.stack(out).double()


def adapted_paths(meta: PolicyGradientMeta, goals: np.ndarray, steps: int = 3, seed: int = 0,
                  trajectories: int = 40) -> list[np.ndarray]:
    """2-D navigation: for each goal, the mean-action path ``[goals, T, 2]`` of the policy before
    adaptation and after each of ``steps`` policy-gradient steps (each on ``trajectories``
    sampled episodes), as :func:`metamap.report.rl.plot_paths` draws them."""
    fam = meta.family
    seeds = lambda phase: [[seed, 0, i, 0, phase] for i in range(len(goals))]
    params = {n: p.detach() for n, p in meta.theta().items()}
    paths = []
    for k in range(steps + 1):
        mean_path = rollout(fam, lambda o, p=params: meta.policy.distribution(p, o), goals, 1, seeds(k),
                            dtype=meta.dtype, deterministic=True)
        paths.append(mean_path.obs[:, 0, :, :2].numpy())
        if k < steps:
            episodes = meta.sample(params, goals, seeds(k), trajectories)
            lr = meta.cfg.inner_lr * (1 if k == 0 else meta.cfg.eval_lr_factor)
            params = adapt_step(meta.policy, params, episodes, meta.advantages(episodes), lr, False)
    return paths
