"""Task families: dynamics and rewards by hand, determinism under a seed, gymnasium's API."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from metamap.errors import ConfigError
from metamap.rl.envs import HalfCheetahDirection, HalfCheetahVelocity, Navigation2D, gym_env, make_family
from metamap.rl.maml import stream
from metamap.rl.policies import GaussianMLPPolicy
from metamap.rl.trajectories import rollout


def test_navigation_dynamics_and_reward_by_hand():
    family = Navigation2D()
    goals = np.array([[0.3, -0.2], [-0.5, 0.5]])
    env = family.make(goals, trajectories=2, seed=0)
    assert env.reset().shape == (2, 2, 2) and not env.reset().any()
    actions = np.array([[[0.5, -3.0], [1.0, 1.0]], [[-1.0, 0.2], [0.0, 0.0]]])   # normalised units
    obs, reward, done = env.step(actions)
    moved = np.clip(0.1 * actions, -0.1, 0.1)            # [-1, 1] -> [-0.1, 0.1], clipped
    np.testing.assert_allclose(obs, moved)
    np.testing.assert_allclose(reward, -np.linalg.norm(moved - goals[:, None], axis=-1))
    assert not done.any()
    assert family.horizon == 100 and family.obs_dim == 2


def test_navigation_terminates_within_the_goal_radius_and_then_earns_nothing():
    family = Navigation2D()
    env = family.make(np.array([[0.095, -0.1]]), trajectories=1, seed=0)
    env.reset()
    _, r1, d1 = env.step(np.array([[[1.0, -1.0]]]))      # lands at (0.1, -0.1): within 0.01 of the goal
    assert d1.all() and r1[0, 0] == pytest.approx(-0.005)
    obs, r2, d2 = env.step(np.array([[[1.0, 1.0]]]))
    assert d2.all() and r2[0, 0] == 0 and np.allclose(obs, [[[0.1, -0.1]]])


def test_goals_are_uniform_in_the_unit_square():
    goals = Navigation2D().sample_tasks(np.random.default_rng(0), 4000)
    assert goals.shape == (4000, 2) and goals.min() >= -0.5 and goals.max() <= 0.5
    assert abs(goals.mean()) < 0.02 and goals.std() == pytest.approx(1 / np.sqrt(12), rel=0.03)


def test_oracle_sees_the_goal():
    family = Navigation2D(oracle=True)
    assert family.policy_obs_dim == 4
    goals = np.array([[0.3, -0.2]])
    env = family.make(goals, 3, 0)
    obs = env.reset()
    np.testing.assert_allclose(obs[0, :, 2:], np.repeat(goals, 3, 0))
    obs, _, _ = env.step(np.zeros((1, 3, 2)))
    assert obs.shape == (1, 3, 4)


def run(family, seed_offset=0, trajectories=3):
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(family.policy_obs_dim, family.act_dim, hidden=(16,))
    params = {n: p.detach() for n, p in policy.named_parameters()}
    tasks = family.sample_tasks(np.random.default_rng([7, seed_offset]), 2)
    seeds = [stream(7 + seed_offset, "train", 0, p, 0) for p in range(2)]
    return tasks, rollout(family, lambda o: policy.distribution(params, o), tasks, trajectories, seeds)


def test_navigation_is_deterministic_under_a_seed():
    family = Navigation2D(horizon=20)
    t1, e1 = run(family)
    t2, e2 = run(family)
    np.testing.assert_array_equal(t1, t2)
    for a, b in zip((e1.obs, e1.actions, e1.rewards, e1.mask), (e2.obs, e2.actions, e2.rewards, e2.mask)):
        assert torch.equal(a, b)
    t3, e3 = run(family, seed_offset=1)
    assert not np.array_equal(t1, t3) and not torch.equal(e1.actions, e3.actions)


def test_a_tasks_rollouts_do_not_depend_on_the_other_tasks_in_the_batch():
    family = Navigation2D(horizon=15)
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(2, 2, hidden=(8,))
    params = {n: p.detach() for n, p in policy.named_parameters()}
    goals = family.sample_tasks(np.random.default_rng(1), 3)
    seeds = [stream(0, "test", i, 0, 0) for i in range(3)]
    dist = lambda o: policy.distribution(params, o)
    both = rollout(family, dist, goals, 4, seeds)
    alone = rollout(family, dist, goals[2:], 4, seeds[2:])
    torch.testing.assert_close(both.rewards[2:], alone.rewards)


def test_unknown_family_and_bad_horizon_are_refused():
    with pytest.raises(ConfigError, match="navigation2d"):
        make_family("maze")
    with pytest.raises(ConfigError, match="horizon"):
        Navigation2D(horizon=0)


def test_navigation_on_gymnasiums_api():
    gymnasium = pytest.importorskip("gymnasium")
    from gymnasium.utils.env_checker import check_env
    env = gym_env(Navigation2D(horizon=5), np.array([0.2, 0.1]))
    check_env(env, skip_render_check=True)
    obs, _ = env.reset(seed=3)
    assert isinstance(env, gymnasium.Env) and obs.shape == (2,)
    obs, reward, terminated, truncated, _ = env.step(np.array([0.1, 0.05]))
    np.testing.assert_allclose(obs, [0.1, 0.05])
    assert reward == pytest.approx(-np.hypot(0.1, 0.05)) and not terminated and not truncated
    for _ in range(4):
        *_, truncated, _ = env.step(np.zeros(2))
    assert truncated


# -- half-cheetah (needs the metamap[rl] extra) ---------------------------------------------------------
def test_cheetah_rewards_and_determinism():
    pytest.importorskip("mujoco")
    pytest.importorskip("gymnasium")
    velocity = HalfCheetahVelocity(horizon=5)
    goals = velocity.sample_tasks(np.random.default_rng(0), 2)
    assert goals.shape == (2, 1) and 0 <= goals.min() and goals.max() <= 2
    env = velocity.make(goals, 1, seed=4)
    obs = env.reset()
    assert obs.shape == (2, 1, 17)
    action = np.full((2, 1, 6), 0.5)
    inner = env.envs[0]
    x0 = float(inner.data.qpos[0])
    obs, reward, done = env.step(action)
    v = (float(inner.data.qpos[0]) - x0) / inner.dt      # forward velocity over the step
    assert reward[0, 0] == pytest.approx(-abs(v - goals[0, 0]) - 0.05 * 6 * 0.25, rel=1e-6, abs=1e-9)
    assert not done.any()
    direction = HalfCheetahDirection(horizon=4)
    dirs = direction.sample_tasks(np.random.default_rng(0), 200)
    assert set(np.unique(dirs)) == {-1.0, 1.0}
    _, a = run(direction, trajectories=2)
    _, b = run(direction, trajectories=2)
    assert torch.equal(a.rewards, b.rewards) and torch.equal(a.obs, b.obs)
    _, c = run(direction, seed_offset=1, trajectories=2)
    assert not torch.equal(a.obs, c.obs)
