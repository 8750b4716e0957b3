"""Meta-RL building blocks against exact references (float64): the policy-gradient estimator,
the linear baseline, TRPO, and MAML's meta-gradient through one policy-gradient step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from metamap.rl.envs import Navigation2D
from metamap.rl.maml import PGConfig, PolicyGradientMeta, stream
from metamap.rl.policies import GaussianMLPPolicy, gaussian_kl
from metamap.rl.policy_gradient import adapt_step, inner_losses, log_probs, surrogate_and_kl
from metamap.rl.trajectories import (Episodes, advantages, baseline_features, discounted_cumsum,
                                     fit_linear_baseline)
from metamap.rl.trpo import conjugate_gradient, flat, kl_hvp, trpo_step


def linear_policy(obs_dim=2, act_dim=2, seed=0) -> GaussianMLPPolicy:
    torch.manual_seed(seed)
    policy = GaussianMLPPolicy(obs_dim, act_dim, hidden=()).double()
    with torch.no_grad():
        policy.log_std.copy_(torch.tensor([-0.3, 0.2])[:act_dim])
        policy.layers[0].bias.copy_(torch.tensor([0.1, -0.2])[:act_dim])
    return policy


# -- the policy-gradient estimator against the exact gradient ---------------------------------------
def test_reinforce_gradient_equals_exact_gradient_by_quadrature():
    """A two-step point-mass MDP (s_1 = 0, s_2 = s_1 + a_1, r_t = -|s_t + a_t - g|^2) with a linear
    Gaussian policy. Gauss-Hermite nodes enumerate the action noise exactly (all integrands are
    polynomials of low degree times the Gaussian density), so the weighted REINFORCE estimator
    with rewards-to-go must equal the exact gradient of the expected return."""
    policy = linear_policy()
    params = {n: p.detach().clone().requires_grad_() for n, p in policy.named_parameters()}
    goal = torch.tensor([0.3, -0.4], dtype=torch.float64)
    x, w = np.polynomial.hermite_e.hermegauss(6)           # nodes/weights for N(0, 1)
    x, w = torch.tensor(x), torch.tensor(w / w.sum())
    e = torch.stack(torch.meshgrid(x, x, x, x, indexing="ij"), -1).reshape(-1, 4)    # [K, 4] noise
    wk = torch.stack(torch.meshgrid(w, w, w, w, indexing="ij"), -1).reshape(-1, 4).prod(-1)

    def unroll(p, noise):
        std = torch.exp(p["log_std"])
        s1 = torch.zeros(noise.shape[0], 2, dtype=torch.float64)
        a1 = s1 @ p["layers.0.weight"].T + p["layers.0.bias"] + std * noise[:, :2]
        s2 = s1 + a1
        a2 = s2 @ p["layers.0.weight"].T + p["layers.0.bias"] + std * noise[:, 2:]
        r1 = -((s1 + a1 - goal) ** 2).sum(-1)
        r2 = -((s2 + a2 - goal) ** 2).sum(-1)
        return torch.stack([s1, s2], 1), torch.stack([a1, a2], 1), torch.stack([r1, r2], 1)

    # Exact: the expected return as a reparameterised integral, differentiated by autograd.
    _, _, r = unroll(params, e)
    exact = torch.autograd.grad((wk * r.sum(1)).sum(), list(params.values()))
    # Estimator: the same trajectories as data; weights folded into the advantages.
    with torch.no_grad():
        obs, act, rew = unroll(params, e)
    k = e.shape[0]
    episodes = Episodes(obs[None], act[None], rew[None], torch.ones(1, k, 2, dtype=torch.float64))
    togo = advantages(episodes, discount=1.0, gae_lambda=1.0, normalize=False, baseline="zero")
    torch.testing.assert_close(togo[0, :, 0], rew.sum(1))            # rewards-to-go
    weighted = togo * (wk * k * 2).reshape(1, k, 1)                    # mean over K*H steps -> sum_k w_k
    loss = inner_losses(policy, params, episodes, weighted).sum()
    estimate = torch.autograd.grad(-loss, list(params.values()))
    for a, b in zip(estimate, exact):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_discounted_cumsum_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(discounted_cumsum(x, 0.5), torch.tensor([[1 + 1 + 0.75, 2 + 1.5, 3.0]],
                                                                        dtype=torch.float64))


def test_gae_lambda_one_is_returns_minus_baseline_and_zero_is_td():
    torch.manual_seed(0)
    t, n, h = 2, 3, 5
    ep = Episodes(torch.randn(t, n, h, 2, dtype=torch.float64), torch.randn(t, n, h, 2, dtype=torch.float64),
                  torch.randn(t, n, h, dtype=torch.float64), torch.ones(t, n, h, dtype=torch.float64))
    g = discounted_cumsum(ep.rewards, 0.9)
    feats = baseline_features(ep.obs, ep.mask)
    v = torch.einsum("tnhd,td->tnh", feats, fit_linear_baseline(feats, g))
    a1 = advantages(ep, 0.9, 1.0, normalize=False)
    torch.testing.assert_close(a1, g - v)
    a0 = advantages(ep, 0.9, 0.0, normalize=False)
    nxt = torch.cat([v[..., 1:], torch.zeros_like(v[..., :1])], -1)
    torch.testing.assert_close(a0, ep.rewards + 0.9 * nxt - v)
    an = advantages(ep, 0.9, 1.0, normalize=True)
    torch.testing.assert_close(an.mean((1, 2)), torch.zeros(t, dtype=torch.float64), atol=1e-12, rtol=0)


# -- the linear feature baseline ---------------------------------------------------------------------
def test_linear_baseline_matches_least_squares():
    torch.manual_seed(1)
    t, n, h = 3, 4, 7
    obs = torch.randn(t, n, h, 2, dtype=torch.float64)
    mask = torch.ones(t, n, h, dtype=torch.float64)
    mask[0, 1, 4:] = 0                                   # a terminated trajectory
    feats = baseline_features(obs, mask)
    assert feats.shape == (t, n, h, 2 * 2 + 4)
    torch.testing.assert_close(feats[1, 2, 3], torch.cat([obs[1, 2, 3], obs[1, 2, 3] ** 2, torch.tensor(
        [0.03, 0.03 ** 2, 0.03 ** 3, 1.0], dtype=torch.float64)]))
    assert float(feats[0, 1, 5].abs().sum()) == 0
    targets = torch.randn(t, n, h, dtype=torch.float64) * mask
    reg = 1e-5
    w = fit_linear_baseline(feats, targets, reg)
    for i in range(t):
        f = feats[i].reshape(-1, 8).numpy()
        aug = np.vstack([f, np.sqrt(reg) * np.eye(8)])
        rhs = np.concatenate([targets[i].reshape(-1).numpy(), np.zeros(8)])
        ref = np.linalg.lstsq(aug, rhs, rcond=None)[0]
        np.testing.assert_allclose(w[i].numpy(), ref, rtol=1e-8, atol=1e-10)


# -- TRPO ----------------------------------------------------------------------------------------------
def test_conjugate_gradient_solves_spd_system():
    torch.manual_seed(2)
    m = torch.randn(6, 6, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    x = conjugate_gradient(lambda v: a @ v, b, iterations=6)
    torch.testing.assert_close(x, torch.linalg.solve(a, b))


def small_meta(inner_steps=1, first_order=False, estimator="paper", hidden=(8,), tasks=3, n=4, horizon=12):
    torch.manual_seed(3)
    family = Navigation2D(horizon=horizon)
    policy = GaussianMLPPolicy(2, 2, hidden=hidden).double()
    cfg = PGConfig(inner_steps=inner_steps, inner_lr=0.3, first_order=first_order, estimator=estimator,
                   trajectories=n)
    meta = PolicyGradientMeta(policy, family, cfg)
    goals = family.sample_tasks(np.random.default_rng(5), tasks)
    batch = meta.collect(goals, lambda phase: [stream(0, "train", 0, p, phase) for p in range(tasks)])
    return meta, batch


def test_kl_hvp_matches_hessian_through_the_inner_step():
    meta, batch = small_meta(hidden=(4,))
    _, kl = meta.objectives(batch)
    params = [p.detach() for p in meta.policy.parameters()]
    sizes = [p.numel() for p in params]

    def kl_flat(v):
        parts = list(torch.split(v, sizes))
        return kl([q.view_as(p) for q, p in zip(parts, params)])
    hessian = torch.autograd.functional.hessian(kl_flat, flat(params))
    v = torch.randn(hessian.shape[0], dtype=torch.float64)
    torch.testing.assert_close(kl_hvp(kl, params, 0.0)(v), hessian @ v, rtol=1e-9, atol=1e-12)
    assert float(kl_flat(flat(params))) == pytest.approx(0.0, abs=1e-14)     # at the sampling policy


@pytest.mark.parametrize("inner_steps", [0, 1])
def test_trpo_step_respects_the_kl_bound_and_improves_the_surrogate(inner_steps):
    meta, batch = small_meta(inner_steps=inner_steps)
    loss, kl = meta.objectives(batch)
    params = [p.detach().clone() for p in meta.policy.parameters()]
    before = float(loss(params))
    new, stats = trpo_step(loss, kl, params, max_kl=0.01)
    assert stats.step_fraction > 0
    after, divergence = float(loss(new)), float(kl(new))
    assert after < before and after == pytest.approx(stats.loss_after)
    assert 0 < divergence <= 0.01
    # The quadratic model's full step nearly exhausts the bound (the line search shrinks it by 0.8^k).
    assert divergence >= 0.01 * 0.8 ** 2 * 0.5 * stats.step_fraction ** 2


# -- MAML's meta-gradient, unrolled by hand ---------------------------------------------------------
def hand_grad_hessian(params, episodes, adv, task, estimator="paper"):
    """Closed-form gradient and Hessian of task ``task``'s REINFORCE loss for a linear Gaussian policy,
    over the parameters [vec(W) row-major, b, log_std]."""
    w, b, ls = params["layers.0.weight"], params["layers.0.bias"], params["log_std"]
    if w.dim() == 3:
        w, b, ls = w[task], b[task], ls[task]
    act, obs_dim = w.shape
    s = episodes.obs[task].reshape(-1, obs_dim)
    a = episodes.actions[task].reshape(-1, act)
    adv_t, mask = adv[task].reshape(-1), episodes.mask[task].reshape(-1)
    m = s @ w.T + b
    sigma = torch.exp(ls)
    z = (a - m) / sigma
    count = mask.sum()
    p = act * obs_dim + 2 * act
    grad, hess = torch.zeros(p, dtype=torch.float64), torch.zeros(p, p, dtype=torch.float64)
    for i in range(s.shape[0]):
        if mask[i] == 0:
            continue
        d = torch.zeros(act, act * obs_dim + act, dtype=torch.float64)
        for k in range(act):
            d[k, k * obs_dim:(k + 1) * obs_dim] = s[i]
            d[k, act * obs_dim + k] = 1.0
        score = torch.cat([d.T @ (z[i] / sigma), z[i] ** 2 - 1])
        h = torch.zeros(p, p, dtype=torch.float64)
        q = act * obs_dim + act
        h[:q, :q] = d.T @ torch.diag(-1 / sigma ** 2) @ d
        h[:q, q:] = d.T @ torch.diag(-2 * z[i] / sigma)
        h[q:, :q] = h[:q, q:].T
        h[q:, q:] = torch.diag(-2 * z[i] ** 2)
        if estimator == "lvc":
            h = h + torch.outer(score, score)
        grad -= adv_t[i] * score / count
        hess -= adv_t[i] * h / count
    return grad, hess


def to_flat(d, task=None):
    pick = (lambda v: v[task]) if task is not None else (lambda v: v)
    return torch.cat([pick(d["layers.0.weight"]).reshape(-1), pick(d["layers.0.bias"]), pick(d["log_std"])])


@pytest.mark.parametrize("first_order,estimator", [(False, "paper"), (True, "paper"), (False, "lvc")])
def test_maml_meta_gradient_equals_hand_unrolled(first_order, estimator):
    meta, batch = small_meta(first_order=first_order, estimator=estimator, hidden=())
    policy, lr = meta.policy, meta.cfg.inner_lr
    theta = {n: p.detach() for n, p in policy.named_parameters()}
    episodes, adv = batch.support[0]
    # The learner: one backward pass of the post-update surrogate through the inner step.
    loss, _ = meta.objectives(batch)
    names = [n for n, _ in policy.named_parameters()]
    leaves = [theta[n].clone().requires_grad_() for n in names]
    got = dict(zip(names, torch.autograd.grad(loss(leaves), leaves)))
    # By hand: theta'_t = theta - lr g_t, J_t = I - lr H_t, meta-gradient = mean_t J_t^T grad L_out,t(theta'_t).
    adapted = adapt_step(policy, theta, episodes, adv, lr, False)
    expected = 0
    for t in range(episodes.num_tasks):
        g, h = hand_grad_hessian(theta, episodes, adv, t, estimator)
        torch.testing.assert_close(to_flat(adapted, t), to_flat(theta) - lr * g)
        g_out, _ = hand_grad_hessian(adapted, batch.query, batch.query_adv, t)
        jac = torch.eye(len(g), dtype=torch.float64) if first_order else torch.eye(len(g), dtype=torch.float64) - lr * h
        expected = expected + jac.T @ g_out / episodes.num_tasks
    torch.testing.assert_close(to_flat(got), expected, rtol=1e-9, atol=1e-12)


def test_lvc_and_paper_estimators_share_value_and_first_derivative():
    meta, batch = small_meta(hidden=(5,))
    episodes, adv = batch.support[0]
    params = {n: p.detach().clone().requires_grad_() for n, p in meta.policy.named_parameters()}
    paper = inner_losses(meta.policy, params, episodes, adv, "paper").sum()
    lvc = inner_losses(meta.policy, params, episodes, adv, "lvc").sum()
    logp, _, _ = log_probs(meta.policy, params, episodes)
    mask = episodes.mask.flatten(1)
    torch.testing.assert_close(lvc, -((adv.flatten(1) * mask).sum(1) / mask.sum(1)).sum())
    for a, b in zip(torch.autograd.grad(paper, list(params.values())), torch.autograd.grad(lvc, list(params.values()))):
        torch.testing.assert_close(a, b)


def test_surrogate_is_minus_mean_advantage_and_kl_zero_at_sampling_policy():
    meta, batch = small_meta()
    adapted = meta.adapt(meta.theta(), batch.support, differentiable=False)
    loss, kl = surrogate_and_kl(meta.policy, adapted, batch.query, batch.query_adv, batch.old)
    mask = batch.query.mask.flatten(1)
    torch.testing.assert_close(loss, -((batch.query_adv.flatten(1) * mask).sum(1) / mask.sum(1)).mean())
    assert float(kl) == pytest.approx(0.0, abs=1e-14)
    m1, l1 = torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64)
    m2, l2 = torch.ones(3, 2, dtype=torch.float64), torch.full((3, 2), np.log(2.0), dtype=torch.float64)
    # KL(N(0,1) || N(1,4)) per coordinate = log 2 + (1 + 1) / 8 - 1/2
    torch.testing.assert_close(gaussian_kl(m1, l1, m2, l2), torch.full((3,), 2 * (np.log(2) + 0.25 - 0.5),
                                                                        dtype=torch.float64))


def test_adapted_paths_start_at_the_origin_and_follow_the_adapted_policy(tmp_path):
    from metamap.report.rl import ci_table, plot_paths
    from metamap.rl.maml import adapted_paths

    meta, _ = small_meta(horizon=5)
    goals = np.array([[0.3, 0.35], [-0.4, 0.1]])
    paths = adapted_paths(meta, goals, steps=2, trajectories=3)
    assert len(paths) == 3 and all(p.shape == (2, 5, 2) for p in paths)
    assert np.allclose(paths[0][:, 0], 0.0)                       # every path starts where the robot does
    assert not np.allclose(paths[0], paths[1]) and not np.allclose(paths[1], paths[2])
    assert np.array_equal(adapted_paths(meta, goals, steps=2, trajectories=3)[2], paths[2])   # seeded
    png = plot_paths(paths, goals, tmp_path / "paths.png", label="toy")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ci_table({"a": [(1.0, 0.5), (2.25, 0.125)], "oracle": [(3.0, 0.0)]}, "k") == (
        "| method | 0 | 1 |\n|---|---|---|\n| a | 1.00 ± 0.50 | 2.25 ± 0.12 |\n| oracle | 3.00 ± 0.00 |  |")
