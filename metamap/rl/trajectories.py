"""Trajectories: sampling them from a policy, returns, the linear feature baseline, advantages.

Shapes: ``T`` tasks, ``N`` trajectories per task, horizon ``H``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from metamap.rl.envs import TaskFamily


@dataclass
class Episodes:
    """``obs [T, N, H, obs]``, ``actions [T, N, H, act]`` (normalised, as sampled), ``rewards``
    and ``mask [T, N, H]`` (1 on steps taken, 0 after a trajectory terminated)."""

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    mask: Tensor

    @property
    def num_tasks(self) -> int:
        return self.obs.shape[0]

    @property
    def steps(self) -> int:
        """Environment steps taken (masked steps not counted)."""
        return int(self.mask.sum())

    def returns(self) -> Tensor:
        """``[T, N]`` undiscounted return of each trajectory."""
        return (self.rewards * self.mask).sum(-1)

    def slice(self, start: int, stop: int) -> Episodes:
        return Episodes(self.obs[start:stop], self.actions[start:stop], self.rewards[start:stop],
                        self.mask[start:stop])


Distribution = Callable[[Tensor], tuple[Tensor, Tensor]]
"""``obs [T, N, obs] -> (mean [T, N, act], log_std [T or 1, 1, act])``."""


def noise_for(seeds: list[list[int]], trajectories: int, horizon: int, act_dim: int) -> np.ndarray:
    """``[T, N, H, act]`` standard normal action noise, one stream per task (so a task's rollouts do
    not depend on which other tasks are sampled with it)."""
    return np.stack([np.random.default_rng(s).standard_normal((trajectories, horizon, act_dim)) for s in seeds])


def rollout(family: TaskFamily, distribution: Distribution, tasks: np.ndarray, trajectories: int,
            seeds: list[list[int]], dtype=torch.float32, deterministic: bool = False) -> Episodes:
    """Run ``trajectories`` episodes of each task with the policy ``distribution``.

    ``seeds[t]`` (a list of integers) seeds task ``t``'s action noise and initial states; the same
    seeds give the same episodes. ``deterministic`` takes the mean action (for plots).
    """
    t, n, h = len(tasks), trajectories, family.horizon
    noise = torch.from_numpy(noise_for(seeds, n, h, family.act_dim)).to(dtype)
    env_seed = int(np.random.SeedSequence([*seeds[0], len(seeds)]).generate_state(1)[0])
    env = family.make(tasks, n, env_seed)
    obs_np = env.reset()
    obs_all, act_all, rew_all, mask_all = [], [], [], []
    alive = np.ones((t, n), dtype=bool)
    with torch.no_grad():
        for step in range(h):
            obs = torch.from_numpy(obs_np).to(dtype)
            mean, log_std = distribution(obs)
            action = mean if deterministic else mean + torch.exp(log_std) * noise[:, :, step]
            obs_np, reward, done = env.step(action.double().numpy())
            obs_all.append(obs)
            act_all.append(action)
            rew_all.append(torch.from_numpy(np.where(alive, reward, 0.0)).to(dtype))
            mask_all.append(torch.from_numpy(alive).to(dtype))
            alive = alive & ~done
    stack = lambda xs: torch.stack(xs, 2)
    return Episodes(stack(obs_all), stack(act_all), stack(rew_all), stack(mask_all))


# -- returns and advantages --------------------------------------------------------------------------
def discounted_cumsum(x: Tensor, factor: float) -> Tensor:
    """``y_t = x_t + factor * y_{t+1}`` along the last axis."""
    out = torch.empty_like(x)
    acc = torch.zeros_like(x[..., 0])
    for i in range(x.shape[-1] - 1, -1, -1):
        acc = x[..., i] + factor * acc
        out[..., i] = acc
    return out


def baseline_features(obs: Tensor, mask: Tensor) -> Tensor:
    """``[T, N, H, 2 obs + 4]``: rllab's linear-baseline features ``[o, o², t, t², t³, 1]`` with
    ``o`` clipped to ``[-10, 10]`` and ``t`` the step index / 100; zero on masked steps."""
    o = obs.clamp(-10, 10)
    h = obs.shape[2]
    al = (torch.arange(h, dtype=obs.dtype) / 100.0).reshape(1, 1, h, 1).expand(*obs.shape[:3], 1)
    f = torch.cat([o, o * o, al, al ** 2, al ** 3, torch.ones_like(al)], -1)
    return f * mask.unsqueeze(-1)


def fit_linear_baseline(features: Tensor, returns: Tensor, reg: float = 1e-5) -> Tensor:
    """Per-task ridge regression: ``[T, N, H, d]`` features, ``[T, N, H]`` targets -> ``[T, d]``.

    Solves ``(F^T F + reg I) w = F^T g`` for each task, multiplying ``reg`` by 10 (up to 5 times)
    while the solution is not finite, as rllab's ``LinearFeatureBaseline`` does.
    """
    t, d = features.shape[0], features.shape[-1]
    f = features.reshape(t, -1, d).double()
    g = returns.reshape(t, -1, 1).double()
    gram, rhs = f.transpose(1, 2) @ f, f.transpose(1, 2) @ g
    eye = torch.eye(d, dtype=torch.float64)
    for _ in range(5):
        w = torch.linalg.solve(gram + reg * eye, rhs)
        if bool(torch.isfinite(w).all()):
            break
        reg *= 10
    return w.squeeze(-1).to(features.dtype)


def advantages(episodes: Episodes, discount: float = 0.99, gae_lambda: float = 1.0, normalize: bool = True,
               baseline: str = "linear") -> Tensor:
    """``[T, N, H]`` advantages from a per-task linear feature baseline fitted on these episodes.

    GAE(``discount``, ``gae_lambda``); ``gae_lambda = 1`` gives returns-to-go minus the baseline
    (rllab's default). ``normalize``: centre and scale per task over the steps taken (rllab's
    ``center_adv``). ``baseline = "zero"`` uses no baseline.
    """
    mask = episodes.mask
    rewards = episodes.rewards * mask
    returns = discounted_cumsum(rewards, discount)
    if baseline == "linear":
        feats = baseline_features(episodes.obs, mask)
        w = fit_linear_baseline(feats, returns)
        values = torch.einsum("tnhd,td->tnh", feats, w) * mask
    elif baseline == "zero":
        values = torch.zeros_like(returns)
    else:
        raise ValueError(f"baseline must be linear or zero, not {baseline!r}")
    next_values = torch.cat([values[..., 1:], torch.zeros_like(values[..., :1])], -1)
    deltas = (rewards + discount * next_values - values) * mask
    adv = discounted_cumsum(deltas, discount * gae_lambda) * mask
    if normalize:
        count = mask.sum((1, 2), keepdim=True).clamp_min(1)
        mean = adv.sum((1, 2), keepdim=True) / count
        var = (((adv - mean) * mask) ** 2).sum((1, 2), keepdim=True) / count
        adv = (adv - mean) / (var.sqrt() + 1e-8) * mask
    return adv.detach()
