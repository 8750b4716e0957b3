"""RL² (Duan et al. 2016): a recurrent policy whose hidden state carries across a task's episodes,
trained with PPO (Schulman et al. 2017) across tasks.

A *trial* is ``episodes`` consecutive episodes of one task. The GRU reads, at every step, the
observation and the previous step's action, reward and done flag (1 on the first step of a new
episode); its hidden state is zero when the trial starts and is never reset inside it, so what
earlier episodes revealed about the task (here: where the goal is) can steer later ones. The
discount runs across the episode boundaries of a trial, so the first episode is rewarded for
exploring. "Adaptation" is nothing but running the policy: the return of episode ``k`` of a
trial is RL²'s return after ``k - 1`` episodes of experience.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from metamap.rl.envs import TaskFamily
from metamap.rl.policies import RecurrentPolicy, gaussian_entropy, gaussian_log_prob
from metamap.rl.trajectories import discounted_cumsum, noise_for


@dataclass
class RL2Config:
    episodes: int = 2                  # episodes per trial in training
    trajectories: int = 20             # trials per task
    discount: float = 0.99
    gae_lambda: float = 0.95
    ppo_clip: float = 0.2
    ppo_epochs: int = 5
    minibatches: int = 4
    value_coef: float = 0.5
    entropy_coef: float = 0.0


@dataclass
class Trials:
    """``inputs [T, N, L, in]`` (what the GRU read), ``actions [T, N, L, act]``, ``rewards``,
    ``mask``, ``values``, ``log_probs [T, N, L]`` with ``L = episodes * horizon``."""

    inputs: Tensor
    actions: Tensor
    rewards: Tensor
    mask: Tensor
    values: Tensor
    log_probs: Tensor
    episodes: int

    @property
    def steps(self) -> int:
        return int(self.mask.sum())

    def episode_returns(self) -> Tensor:
        """``[T, N, episodes]`` undiscounted return of each episode of each trial."""
        t, n, length = self.rewards.shape
        return (self.rewards * self.mask).reshape(t, n, self.episodes, length // self.episodes).sum(-1)


def run_trials(policy: RecurrentPolicy, family: TaskFamily, tasks: np.ndarray, trajectories: int,
               episodes: int, seeds: list[list[int]], dtype=torch.float32) -> Trials:
    """``trajectories`` trials of ``episodes`` episodes on each task; seeded like :func:`rollout`."""
    t, n, h = len(tasks), trajectories, family.horizon
    noise = torch.from_numpy(noise_for(seeds, n, episodes * h, family.act_dim)).to(dtype)
    state = policy.initial_state(t * n, dtype)           # zero when the trial (the task) starts
    prev_a = torch.zeros(t, n, family.act_dim, dtype=dtype)
    prev_r = torch.zeros(t, n, dtype=dtype)
    prev_d = torch.zeros(t, n, dtype=dtype)
    rec = {k: [] for k in ("inputs", "actions", "rewards", "mask", "values", "log_probs")}
    with torch.no_grad():
        for e in range(episodes):
            env_seed = int(np.random.SeedSequence([*seeds[0], len(seeds), e]).generate_state(1)[0])
            env = family.make(tasks, n, env_seed)
            obs = env.reset()
            alive = np.ones((t, n), dtype=bool)
            for step in range(h):
                x = policy.inputs(torch.from_numpy(obs).to(dtype), prev_a, prev_r, prev_d)
                mean, log_std, value, state = policy(x.reshape(t * n, 1, -1), state)
                mean, value = mean.reshape(t, n, -1), value.reshape(t, n)
                action = mean + torch.exp(log_std) * noise[:, :, e * h + step]
                obs, reward, done = env.step(action.double().numpy())
                r = torch.from_numpy(np.where(alive, reward, 0.0)).to(dtype)
                for k, v in (("inputs", x), ("actions", action), ("rewards", r),
                             ("mask", torch.from_numpy(alive).to(dtype)), ("values", value),
                             ("log_probs", gaussian_log_prob(mean, log_std, action))):
                    rec[k].append(v)
                alive = alive & ~done
                prev_a, prev_r = action, r
                prev_d = torch.full((t, n), float(step == h - 1), dtype=dtype)
    return Trials(**{k: torch.stack(v, 2) for k, v in rec.items()}, episodes=episodes)


def gae(trials: Trials, discount: float, lam: float) -> tuple[Tensor, Tensor]:
    """``(advantages, value targets)`` ``[T, N, L]``, bootstrapping across episode boundaries of a trial
    (masked steps are skipped: they carry no reward and no value)."""
    mask = trials.mask
    v = trials.values * mask
    nxt = torch.cat([v[..., 1:], torch.zeros_like(v[..., :1])], -1)
    # The value of the next step taken: after a terminated episode, the next episode's first step.
    deltas = (trials.rewards + discount * nxt - v) * mask
    adv = discounted_cumsum(deltas, discount * lam) * mask
    return adv, (adv + v) * mask


class RL2:
    """RL² on one recurrent policy and task family; a learner wraps it."""

    def __init__(self, policy: RecurrentPolicy, family: TaskFamily, cfg: RL2Config):
        self.policy, self.family, self.cfg = policy, family, cfg

    def collect(self, tasks: np.ndarray, seeds: list[list[int]], episodes: int | None = None,
                trajectories: int | None = None) -> Trials:
        return run_trials(self.policy, self.family, tasks, trajectories or self.cfg.trajectories,
                          episodes or self.cfg.episodes, seeds, self.policy.log_std.dtype)

    def ppo_loss(self, trials: Trials, adv: Tensor, targets: Tensor, rows: Tensor) -> tuple[Tensor, dict]:
        """Clipped surrogate + value loss - entropy bonus on the trials ``rows`` of ``[T * N]``."""
        c = self.cfg
        flat = lambda x: x.flatten(0, 1)[rows]
        x = flat(trials.inputs)
        mean, log_std, value, _ = self.policy(x, self.policy.initial_state(x.shape[0], x.dtype))
        logp = gaussian_log_prob(mean, log_std, flat(trials.actions))
        mask, a = flat(trials.mask), flat(adv)
        ratio = torch.exp(logp - flat(trials.log_probs))
        gain = torch.minimum(ratio * a, ratio.clamp(1 - c.ppo_clip, 1 + c.ppo_clip) * a)
        count = mask.sum().clamp_min(1)
        policy_loss = -(gain * mask).sum() / count
        value_loss = (((value - flat(targets)) ** 2) * mask).sum() / count
        entropy = gaussian_entropy(log_std)
        loss = policy_loss + c.value_coef * value_loss - c.entropy_coef * entropy
        with torch.no_grad():
            kl = ((flat(trials.log_probs) - logp) * mask).sum() / count
        return loss, {"policy_loss": float(policy_loss.detach()), "value_loss": float(value_loss.detach()),
                      "entropy": float(entropy.detach()), "kl": float(kl)}

    def advantages(self, trials: Trials) -> tuple[Tensor, Tensor]:
        adv, targets = gae(trials, self.cfg.discount, self.cfg.gae_lambda)
        count = trials.mask.sum().clamp_min(1)
        mean = adv.sum() / count
        std = ((((adv - mean) * trials.mask) ** 2).sum() / count).sqrt()
        return ((adv - mean) / (std + 1e-8)) * trials.mask, targets

    def minibatches(self, trials: Trials, generator: torch.Generator):
        """Index sets over the ``T * N`` trials: ``minibatches`` per epoch, ``ppo_epochs`` epochs."""
        total = trials.inputs.shape[0] * trials.inputs.shape[1]
        parts = max(1, min(self.cfg.minibatches, total))
        for _ in range(self.cfg.ppo_epochs):
            yield from torch.randperm(total, generator=generator).chunk(parts)

    def ppo_update(self, optimizer: torch.optim.Optimizer, trials: Trials, generator: torch.Generator,
                   clip_grad: float = 0.0) -> dict:
        """PPO's epochs of minibatch steps on one batch of trials; the mean of their statistics."""
        adv, targets = self.advantages(trials)
        stats: dict[str, float] = {}
        steps = 0
        for rows in self.minibatches(trials, generator):
            optimizer.zero_grad(set_to_none=True)
            loss, s = self.ppo_loss(trials, adv, targets, rows)
            loss.backward()
            if clip_grad:
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), clip_grad)
            optimizer.step()
            steps += 1
            for k, v in s.items():
                stats[k] = stats.get(k, 0.0) + v
        return {k: v / max(steps, 1) for k, v in stats.items()}
