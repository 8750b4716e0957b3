"""RL²: the hidden state is carried across the episodes of a task and starts afresh for every task."""
from __future__ import annotations

import numpy as np
import torch

from metamap.rl.envs import Navigation2D
from metamap.rl.maml import stream
from metamap.rl.policies import RecurrentPolicy, gaussian_log_prob
from metamap.rl.rl2 import RL2, RL2Config, gae


def make(episodes=3, horizon=6, hidden=8):
    torch.manual_seed(0)
    family = Navigation2D(horizon=horizon)
    policy = RecurrentPolicy(2, 2, hidden=hidden).double()
    return RL2(policy, family, RL2Config(episodes=episodes, trajectories=2)), family


def trials_for(rl2, goals, seed=0):
    return rl2.collect(goals, [stream(seed, "train", 0, p, 0) for p in range(len(goals))])


def test_hidden_state_is_carried_across_episodes_of_a_trial():
    rl2, family = make()
    goals = family.sample_tasks(np.random.default_rng(0), 2)
    tr = trials_for(rl2, goals)
    h = family.horizon
    assert tr.inputs.shape == (2, 2, 3 * h, 2 + 2 + 2)
    done_flag = tr.inputs[..., -1]
    expected = torch.zeros(3 * h, dtype=torch.float64)
    expected[[h, 2 * h]] = 1.0                         # first step of the 2nd and 3rd episodes
    assert torch.equal(done_flag[0, 0], expected)
    assert torch.equal(tr.inputs[:, :, h, :2], torch.zeros(2, 2, 2, dtype=torch.float64))   # env was reset
    # The whole trial read as one sequence from a zero state reproduces the sampled log-probs.
    x = tr.inputs.flatten(0, 1)
    mean, log_std, _, _ = rl2.policy(x, rl2.policy.initial_state(x.shape[0], x.dtype))
    torch.testing.assert_close(gaussian_log_prob(mean, log_std, tr.actions.flatten(0, 1)),
                               tr.log_probs.flatten(0, 1))
    # Resetting the state at the episode boundary would change episode 2: the state carries.
    fresh, _, _, _ = rl2.policy(x[:, h:2 * h], rl2.policy.initial_state(x.shape[0], x.dtype))
    assert (fresh - mean[:, h:2 * h]).abs().max() > 1e-6


def test_hidden_state_starts_afresh_for_every_task():
    rl2, family = make()
    goals = family.sample_tasks(np.random.default_rng(1), 3)
    seeds = [stream(0, "test", i, 0, 0) for i in range(3)]
    together = rl2.collect(goals, seeds)
    again = rl2.collect(goals, seeds)                  # nothing leaks from one call to the next
    assert torch.equal(together.log_probs, again.log_probs)
    alone = rl2.collect(goals[1:2], seeds[1:2])        # nor from the other tasks of the batch
    torch.testing.assert_close(alone.log_probs[0], together.log_probs[1])
    torch.testing.assert_close(alone.rewards[0], together.rewards[1])


def test_episode_returns_and_gae_across_episode_boundaries():
    rl2, family = make(episodes=2, horizon=3)
    goals = family.sample_tasks(np.random.default_rng(2), 1)
    tr = trials_for(rl2, goals)
    torch.testing.assert_close(tr.episode_returns()[..., 0], tr.rewards[..., :3].sum(-1))
    torch.testing.assert_close(tr.episode_returns()[..., 1], tr.rewards[..., 3:].sum(-1))
    adv, targets = gae(tr, 0.9, 1.0)
    # lambda = 1: advantage = discounted return to the end of the trial minus the value.
    ret = torch.zeros_like(tr.rewards)
    acc = torch.zeros_like(tr.rewards[..., 0])
    for i in range(5, -1, -1):
        acc = tr.rewards[..., i] + 0.9 * acc
        ret[..., i] = acc
    torch.testing.assert_close(adv, ret - tr.values)
    torch.testing.assert_close(targets, ret)


def test_ppo_update_improves_its_surrogate_and_stays_near():
    rl2, family = make(episodes=2, horizon=10, hidden=16)
    goals = family.sample_tasks(np.random.default_rng(3), 4)
    tr = trials_for(rl2, goals)
    adv, targets = rl2.advantages(tr)
    everything = torch.arange(8)
    before, _ = rl2.ppo_loss(tr, adv, targets, everything)
    opt = torch.optim.Adam(rl2.policy.parameters(), lr=1e-3)
    stats = rl2.ppo_update(opt, tr, torch.Generator().manual_seed(0))
    after, s = rl2.ppo_loss(tr, adv, targets, everything)
    assert float(after.detach()) < float(before.detach())
    assert abs(s["kl"]) < 0.05 and set(stats) == {"policy_loss", "value_loss", "entropy", "kl"}
