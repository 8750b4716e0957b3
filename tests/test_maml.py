"""Correctness of the gradient-based learners against hand-written references (float64).

The reference meta-gradient unrolls the inner loop by hand, one task at a time, with plain
modules and ``torch.autograd``; the library's batched formulation (grouped convolutions, task
batched matmuls) and its per-task fallback must both match it to 1e-8 relative error -- the
tolerance that catches e.g. F.batch_norm's wrong second-order gradients under vmap (3e-3).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metamap.algorithms.base import MetaGradient
from metamap.algorithms.gradient import GradientLearner, Reptile, msl_weights
from metamap.algorithms.inner_opt import SGD, Adam, PerElementSGD, PerLayerPerStepSGD, build_inner_optimizer
from metamap.errors import ConfigError, MetamapError
from metamap.nets.backbones import MLP, Conv4
from metamap.tasks.batch import TaskBatch

T, W, S, Q = 3, 3, 3, 6


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def conv_learner(norm=True, **kw) -> GradientLearner:
    torch.manual_seed(0)
    body = Conv4(in_channels=1, hidden=4, layers=2, image_size=8, norm=norm)
    return GradientLearner(body, nn.Linear(body.out_features, W), 3, ways=W, channels_last=False, **kw)


def conv_tasks(seed=1) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(torch.randn(T, S, 1, 8, 8, generator=g), torch.arange(W).repeat(T, 1),
                     torch.randn(T, Q, 1, 8, 8, generator=g),
                     torch.arange(W).repeat_interleave(Q // W).repeat(T, 1), W)


def unrolled_meta_grad(learner: GradientLearner, tasks: TaskBatch, steps: int, lr, adapt=None,
                       first_order=False) -> dict[str, torch.Tensor]:
    """Task by task, step by step, with the plain module (batch statistics per task)."""
    model = learner.model.train()
    theta = dict(model.named_parameters())
    adapt = list(theta) if adapt is None else adapt
    lr_of = lr if callable(lr) else (lambda n, k: lr)
    total = 0.0
    for t in range(tasks.num_tasks):
        fast = dict(theta)
        for k in range(steps):
            loss = F.cross_entropy(functional_call(model, fast, (tasks.support_x[t],)), tasks.support_y[t])
            grads = torch.autograd.grad(loss, [fast[n] for n in adapt], create_graph=not first_order)
            for n, g in zip(adapt, grads):
                fast[n] = fast[n] - lr_of(n, k) * (g.detach() if first_order else g)
        total = total + F.cross_entropy(functional_call(model, fast, (tasks.query_x[t],)), tasks.query_y[t])
    params = [p for p in learner.parameters() if p.requires_grad]
    grads = torch.autograd.grad(total / tasks.num_tasks, params, allow_unused=True)
    names = {id(p): n for n, p in learner.named_parameters()}
    return {names[id(p)]: (torch.zeros_like(p) if g is None else g) for p, g in zip(params, grads)}


def library_meta_grad(learner: GradientLearner, tasks: TaskBatch) -> dict[str, torch.Tensor]:
    """The meta-gradient the trainer applies: the learner's ``meta_backward`` into ``.grad``."""
    learner.train()
    learner.zero_grad(set_to_none=True)
    learner.meta_backward(tasks, MetaGradient())
    params = [(n, p) for n, p in learner.named_parameters() if p.requires_grad]
    grads = {n: (torch.zeros_like(p) if p.grad is None else p.grad.clone()) for n, p in params}
    learner.zero_grad(set_to_none=True)
    return grads


def meta_loss_grad(learner: GradientLearner, tasks: TaskBatch) -> dict[str, torch.Tensor]:
    """The gradient of ``meta_loss`` by autograd (what the trainer applied before the hook)."""
    learner.train()
    loss, _ = learner.meta_loss(tasks)
    params = [p for p in learner.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    names = {id(p): n for n, p in learner.named_parameters()}
    return {names[id(p)]: (torch.zeros_like(p) if g is None else g) for p, g in zip(params, grads)}


def rel_err(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    x = torch.cat([a[k].flatten() for k in a])
    y = torch.cat([b[k].flatten() for k in a])
    return float((x - y).norm() / y.norm())


@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("steps", [1, 3])
def test_second_order_maml_matches_unrolled_loop(steps, norm, backend):
    learner = conv_learner(norm=norm, inner_steps=steps, inner_lr=0.4, backend=backend)
    assert learner.full.name == backend
    tasks = conv_tasks()
    ref = unrolled_meta_grad(learner, tasks, steps, 0.4)
    got = library_meta_grad(learner, tasks)
    assert rel_err(got, ref) < 1e-8
    # The hook's default is exactly the gradient of meta_loss.
    assert rel_err(meta_loss_grad(learner, tasks), got) < 1e-12
    # Second-order terms matter here: the first-order gradient is far from it.
    assert rel_err(unrolled_meta_grad(learner, tasks, steps, 0.4, first_order=True), ref) > 1e-3


def test_first_order_maml_matches_unrolled_first_order_loop():
    learner = conv_learner(inner_steps=2, inner_lr=0.3, first_order=True)
    tasks = conv_tasks()
    assert rel_err(library_meta_grad(learner, tasks),
                   unrolled_meta_grad(learner, tasks, 2, 0.3, first_order=True)) < 1e-8


# -- closed forms on a quadratic: linear regression y = x @ w, mean squared error -------------
def quadratic(steps=1, lr=0.1, cls=GradientLearner, **kw):
    torch.manual_seed(0)
    learner = cls(nn.Identity(), nn.Linear(4, 1, bias=False), 1, inner_steps=steps, inner_lr=lr, **kw)
    g = torch.Generator().manual_seed(3)
    tasks = TaskBatch(torch.randn(T, 5, 4, generator=g), torch.randn(T, 5, generator=g),
                      torch.randn(T, 7, 4, generator=g), torch.randn(T, 7, generator=g))
    return learner, tasks


def grad_mse(w, x, y):
    """Gradient of mean((x w - y)^2) w.r.t. w: (2/n) x^T (x w - y);  x [n, d], y [n], w [d]."""
    return 2.0 / x.shape[0] * x.T @ (x @ w - y)


def test_fomaml_and_maml_closed_forms_on_quadratic():
    lr = 0.1
    for first_order in (True, False):
        learner, tasks = quadratic(lr=lr, first_order=first_order)
        theta = learner.model.head.weight.detach()[0]
        expected = torch.zeros(4)
        for t in range(T):
            xs, ys, xq, yq = tasks.support_x[t], tasks.support_y[t], tasks.query_x[t], tasks.query_y[t]
            phi = theta - lr * grad_mse(theta, xs, ys)
            gq = grad_mse(phi, xq, yq)
            hessian = 2.0 / xs.shape[0] * xs.T @ xs
            expected += gq if first_order else (torch.eye(4) - lr * hessian) @ gq
        got = library_meta_grad(learner, tasks)["model.head.weight"][0]
        torch.testing.assert_close(got, expected / T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 4])
def test_reptile_closed_form_on_quadratic(steps):
    lr = 0.05
    learner, tasks = quadratic(steps=steps, lr=lr, cls=Reptile)
    theta = learner.model.head.weight.detach()[0]
    phis = []
    for t in range(T):
        phi = theta.clone()
        for _ in range(steps):
            phi = phi - lr * grad_mse(phi, tasks.support_x[t], tasks.support_y[t])
        phis.append(phi)
    got = library_meta_grad(learner, tasks)["model.head.weight"][0]
    # The meta-gradient is theta - mean(phi): an SGD outer step of size eps is Reptile's.
    torch.testing.assert_close(got, theta - torch.stack(phis).mean(0), rtol=1e-12, atol=1e-12)


def test_reptile_sgd_outer_step_is_the_reptile_update():
    learner, tasks = quadratic(steps=3, lr=0.05, cls=Reptile)
    theta = learner.model.head.weight.detach().clone()
    learner.eval()
    history, _ = learner._adapt(tasks.support_x, tasks.support_y, 3, False)
    phi_mean = history[-1]["head.weight"].mean(0)      # no body weights: the head runs alone
    opt = torch.optim.SGD(learner.parameters(), lr=0.5)
    learner.train()
    loss, _ = learner.meta_backward(tasks, MetaGradient())
    opt.step()
    torch.testing.assert_close(learner.model.head.weight.detach(), theta + 0.5 * (phi_mean - theta))
    # The reported loss is the query loss after adaptation, with no graph behind it.
    assert loss.grad_fn is None and float(loss) > 0


def test_reptile_update_in_chunks_is_the_whole_batch_update():
    learner, tasks = quadratic(steps=2, lr=0.05, cls=Reptile)
    whole = library_meta_grad(learner, tasks)
    learner.train()
    for start, stop in ((0, 1), (1, 3)):
        learner.meta_backward(tasks.slice(start, stop), MetaGradient((stop - start) / T))
    chunked = {n: p.grad for n, p in learner.named_parameters() if p.requires_grad}
    assert rel_err(chunked, whole) < 1e-12


def test_reptile_with_adam_inner_steps_on_mini_batches_on_a_quadratic():
    """Reptile's recipe: Adam (beta1 = 0) inner steps, each on a different mini-batch of the support
    set, by hand: per task, shuffle the examples, deal them out two at a time, reshuffle when out."""
    from metamap.algorithms.inner_loop import minibatch_indices
    from metamap.algorithms.seeding import content_generator
    lr, steps, batch = 0.01, 4, 2
    learner, tasks = quadratic(steps=steps, lr=lr, cls=Reptile, inner_optimizer="adam", inner_batch=batch, seed=5)
    theta = learner.model.head.weight.detach()[0]
    b2, eps = 0.999, 1e-8
    phis = []
    for t in range(T):
        g = content_generator(5, tasks.support_x[t])
        order = torch.cat([torch.randperm(5, generator=g) for _ in range(2)])      # 8 of 2 x 5 positions
        phi, v = theta.clone(), torch.zeros(4)
        for k in range(steps):
            rows = order[batch * k: batch * (k + 1)]
            grad = grad_mse(phi, tasks.support_x[t][rows], tasks.support_y[t][rows])
            v = b2 * v + (1 - b2) * grad * grad
            phi = phi - lr * grad / ((v / (1 - b2 ** (k + 1))).sqrt() + eps)     # beta1 = 0: m = g
        phis.append(phi)
    idx = minibatch_indices(tasks.support_x, batch, steps, 5)
    assert idx.shape == (steps, T, batch)
    # The first five positions dealt to a task are one shuffle of its whole support set.
    assert sorted(idx[:, 0].flatten()[:5].tolist()) == [0, 1, 2, 3, 4]
    got = library_meta_grad(learner, tasks)["model.head.weight"][0]
    torch.testing.assert_close(got, theta - torch.stack(phis).mean(0), rtol=1e-12, atol=1e-12)


# -- ANIL, Meta-SGD, MAML++ ---------------------------------------------------------------------
def test_anil_leaves_body_untouched_and_matches_unrolled_loop():
    learner = conv_learner(inner_steps=2, adapt="head")
    assert learner.adapt_names == ["head.weight", "head.bias"]
    tasks = conv_tasks()
    learner.eval()
    history, _ = learner._adapt(tasks.support_x, tasks.support_y, 2, False)
    # Only head weights exist in the inner loop, and they differ per task after adapting.
    per_task = {n for n, v in history[-1].items() if v.dim() == learner.model.get_parameter(n).dim() + 1}
    assert per_task == {"head.weight", "head.bias"} and history[-1]["head.weight"].shape == (T, W, 16)
    assert not torch.equal(history[-1]["head.weight"][0], history[-1]["head.weight"][1])
    body_before = {n: p.detach().clone() for n, p in learner.model.body.named_parameters()}
    ref = unrolled_meta_grad(learner, tasks, 2, 0.4, adapt=["head.weight", "head.bias"])
    got = library_meta_grad(learner, tasks)
    assert rel_err(got, ref) < 1e-8
    assert float(got["model.body.features.0.0.weight"].abs().sum()) > 0      # the body is meta-learned
    for n, p in learner.model.body.named_parameters():
        assert torch.equal(p, body_before[n])


def test_meta_sgd_step_sizes_get_exact_gradients():
    learner = conv_learner(inner_steps=2, inner_lr=0.2, step_sizes="per_element")
    with torch.no_grad():          # distinct step sizes per element, so a mix-up would show
        for p in learner.inner_optimizer.parameters():
            p.mul_(torch.rand_like(p) + 0.5)
    tasks = conv_tasks()
    lr = lambda n, k: learner.inner_optimizer.step_size(n, k)
    ref = unrolled_meta_grad(learner, tasks, 2, lr)
    got = library_meta_grad(learner, tasks)
    assert rel_err(got, ref) < 1e-8
    sizes = [k for k in got if k.startswith("inner_optimizer.")]
    assert len(sizes) == len(list(learner.model.parameters()))
    # A convolution bias followed by batch norm cancels out, so its step sizes' true gradient
    # is zero; every other step size must receive one.
    cancelled = [k for k in sizes if k.endswith("__0__bias")]
    assert cancelled and all(float(got[k].abs().max()) < 1e-12 for k in cancelled)
    assert all(float(got[k].abs().sum()) > 0 for k in sizes if k not in cancelled)


def test_maml_plus_plus_step_sizes_and_multi_step_loss():
    learner = conv_learner(inner_steps=3, inner_lr=0.2, step_sizes="per_layer_per_step",
                           multi_step_loss=True, msl_anneal_steps=10)
    with torch.no_grad():
        for p in learner.inner_optimizer.parameters():
            p.copy_(torch.tensor([0.1, 0.2, 0.3]))
    tasks = conv_tasks()
    learner.train()
    loss, _ = learner.meta_loss(tasks)
    # By hand: the weighted sum of the query losses after steps 1, 2, 3 (uniform at the start).
    model, theta = learner.model, dict(learner.model.named_parameters())
    expected = 0.0
    for t in range(T):
        fast = dict(theta)
        for k in range(3):
            inner = F.cross_entropy(functional_call(model, fast, (tasks.support_x[t],)), tasks.support_y[t])
            g = torch.autograd.grad(inner, list(fast.values()), create_graph=True)
            fast = {n: v - 0.1 * (k + 1) * gi for (n, v), gi in zip(fast.items(), g)}
            q = F.cross_entropy(functional_call(model, fast, (tasks.query_x[t],)), tasks.query_y[t])
            expected = expected + q / 3
    torch.testing.assert_close(loss, expected / T, rtol=1e-10, atol=0)
    names, sizes = zip(*learner.inner_optimizer.named_parameters())
    grads = dict(zip(names, torch.autograd.grad(loss, sizes, allow_unused=True)))
    # Every layer and step gets a gradient, except a convolution bias that batch norm cancels
    # (the first one drops out of the graph altogether: its batch norm is folded into it).
    assert all(bool((g != 0).all()) for n, g in grads.items() if not n.endswith("__0__bias"))
    assert all(g is None or float(g.abs().max()) < 1e-12 for n, g in grads.items() if n.endswith("__0__bias"))
    # Meta-batches are counted once per outer update (the trainer's after_step), not per meta_loss
    # call, so a meta-batch split into chunks still counts once.
    assert int(learner.outer_steps) == 0
    learner.after_step()
    assert int(learner.outer_steps) == 1


def test_msl_weights_anneal_from_uniform_to_final():
    torch.testing.assert_close(msl_weights(4, 0.0), torch.full((4,), 0.25))
    end = msl_weights(4, 1.0)
    torch.testing.assert_close(end, torch.tensor([0.0075, 0.0075, 0.0075, 0.9775]))
    torch.testing.assert_close(msl_weights(4, 0.5).sum(), torch.tensor(1.0))


def test_step_sizes_modes():
    shapes = {"a": torch.Size([2, 3])}
    fixed = build_inner_optimizer("sgd", "fixed", 0.4, shapes, 2)
    assert type(fixed) is SGD and fixed.step_size("a", 5) == 0.4 and not list(fixed.parameters())
    lslr = build_inner_optimizer("sgd", "per_layer_per_step", 0.4, shapes, 2)
    assert isinstance(lslr, PerLayerPerStepSGD)
    assert lslr.step_size("a", 0).shape == () and lslr.step_size("a", 7) is not None   # beyond training: last one
    meta_sgd = build_inner_optimizer("sgd", "per_element", 0.4, shapes, 2)
    assert isinstance(meta_sgd, PerElementSGD) and meta_sgd.step_size("a", 0).shape == (2, 3)
    assert isinstance(build_inner_optimizer("adam", "fixed", 1e-3, shapes, 2), Adam)
    with pytest.raises(ConfigError):
        build_inner_optimizer("sgd", "adam", 0.4, shapes, 1)
    with pytest.raises(ConfigError, match="inner_optimizer"):
        build_inner_optimizer("rmsprop", "fixed", 0.4, shapes, 1)
    with pytest.raises(ConfigError, match="leave step_sizes"):
        build_inner_optimizer("adam", "per_element", 0.4, shapes, 1)
    with pytest.raises(ConfigError, match="inner_beta1"):
        build_inner_optimizer("adam", "fixed", 0.4, shapes, 1, beta1=1.0)


def test_each_inner_optimizer_step_by_hand():
    g1, g2 = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 4.0]])       # one task, two inner steps
    w0 = torch.tensor([[0.3, 0.7]])
    shapes = {"w": torch.Size([2])}
    sgd = SGD(0.1)
    w1, _ = sgd.step({"w": w0}, {"w": g1}, sgd.init({"w": w0}), 0)
    torch.testing.assert_close(w1["w"], w0 - 0.1 * g1)
    lslr = PerLayerPerStepSGD(shapes, 0.1, 2)
    with torch.no_grad():
        lslr.sizes["w"].copy_(torch.tensor([0.1, 0.3]))
    a, _ = lslr.step({"w": w0}, {"w": g1}, (), 0)
    b, _ = lslr.step(a, {"w": g2}, (), 1)
    torch.testing.assert_close(b["w"], w0 - 0.1 * g1 - 0.3 * g2)
    per_element = PerElementSGD(shapes, 0.1)
    with torch.no_grad():
        per_element.sizes["w"].copy_(torch.tensor([0.2, 0.5]))
    c, _ = per_element.step({"w": w0}, {"w": g1}, (), 0)
    torch.testing.assert_close(c["w"], w0 - torch.tensor([0.2, 0.5]) * g1)
    # Adam with momentum, two steps, bias-corrected, by hand.
    adam = Adam(0.01, beta1=0.9, beta2=0.99, eps=1e-8)
    state = adam.init({"w": w0})
    assert len(state) == 3 and all(float(s.abs().sum()) == 0 for s in state)      # m, v, step count
    d, state = adam.step({"w": w0}, {"w": g1}, state, 0)
    e, state = adam.step(d, {"w": g2}, state, 1)
    m1, v1 = 0.1 * g1, 0.01 * g1 ** 2
    x1 = w0 - 0.01 * (m1 / 0.1) / ((v1 / 0.01).sqrt() + 1e-8)
    m2, v2 = 0.9 * m1 + 0.1 * g2, 0.99 * v1 + 0.01 * g2 ** 2
    x2 = x1 - 0.01 * (m2 / (1 - 0.9 ** 2)) / ((v2 / (1 - 0.99 ** 2)).sqrt() + 1e-8)
    torch.testing.assert_close(d["w"], x1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(e["w"], x2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state[0], m2)
    assert int(state[2]) == 2
    # An unreached weight (no gradient) is left alone, and so is its state.
    f, same = adam.step({"w": w0}, {"w": None}, state, 2)
    assert f["w"] is w0 and same[1] is state[1]


def test_learned_step_sizes_are_differentiable_and_saved():
    shapes = {"w": torch.Size([2])}
    per_element = PerElementSGD(shapes, 0.1)
    w0, g = torch.tensor([[0.3, 0.7]], requires_grad=True), torch.tensor([[1.0, -2.0]])
    w1, _ = per_element.step({"w": w0}, {"w": g}, (), 0)
    (d_lr,) = torch.autograd.grad(w1["w"].sum(), list(per_element.parameters()))
    torch.testing.assert_close(d_lr, -g[0])               # d(w - lr g)/d lr = -g
    learner = conv_learner(step_sizes="per_layer_per_step", inner_steps=2)
    keys = [k for k in learner.state_dict() if "inner_optimizer" in k]
    assert keys and all(k.startswith("inner_optimizer.sizes.") for k in keys)
    # Checkpoints written before the inner optimizer objects named them step_sizes.sizes.*.
    old = {k.replace("inner_optimizer.", "step_sizes.", 1): v for k, v in learner.state_dict().items()}
    assert set(learner.upgrade_state(old)) == set(learner.state_dict())


# -- options: steps at train/test, frozen and unused parameters, batch-norm modes, eval ----------
def test_inner_steps_differ_between_training_and_evaluation():
    learner = conv_learner(inner_steps=1, inner_steps_eval=4)
    tasks = conv_tasks()
    learner.train()
    assert learner.steps() == 1
    learner.eval()
    assert learner.steps() == 4
    out = learner.adapt_tasks(tasks.support_x, tasks.support_y, W)(tasks.query_x)
    by_hand = learner.adapt_trajectory(tasks.support_x, tasks.support_y, 4)
    torch.testing.assert_close(out, by_hand[4](tasks.query_x), rtol=0, atol=0)
    assert not out.requires_grad                               # no graph kept at evaluation


def test_frozen_parameters_are_neither_adapted_nor_meta_learned():
    learner = conv_learner(inner_steps=2)
    first = learner.model.body.features[0][0]
    first.weight.requires_grad_(False)
    learner = GradientLearner(learner.model.body, learner.model.head, 3, ways=W, inner_steps=2,
                              channels_last=False)
    assert "body.features.0.0.weight" not in learner.adapt_names
    tasks = conv_tasks()
    adapt = [n for n in learner.adapt_names]
    ref = unrolled_meta_grad(learner, tasks, 2, 0.4, adapt=adapt)
    got = library_meta_grad(learner, tasks)
    assert "model.body.features.0.0.weight" not in got
    assert rel_err(got, ref) < 1e-8


def test_explicitly_adapted_frozen_weight_and_unused_parameters_work():
    class HeadWithSpare(nn.Module):        # an unknown module: the per-task loop runs it
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(16, W)
            self.spare = nn.Parameter(torch.ones(3))      # never used in forward

        def forward(self, x):
            return self.linear(x)

    torch.manual_seed(0)
    body = Conv4(1, 4, 2, 8)
    body.features[0][0].bias.requires_grad_(False)
    learner = GradientLearner(body, HeadWithSpare(), 3, ways=W, inner_steps=2,
                              adapt=["body.features.0.0.bias", "head"], channels_last=False)
    assert learner.full.name == "reference"
    tasks = conv_tasks()
    learner.train()
    loss, _ = learner.meta_loss(tasks)
    loss.backward()
    assert learner.model.head.spare.grad is None or float(learner.model.head.spare.grad.abs().sum()) == 0
    assert body.features[0][0].bias.grad is None                      # frozen: not meta-learned
    learner.eval()
    history, _ = learner._adapt(tasks.support_x, tasks.support_y, 2, False)
    assert not torch.equal(history[-1]["body.features.0.0.bias"][0], body.features[0][0].bias)
    torch.testing.assert_close(history[-1]["head.spare"], torch.ones(3).expand(T, 3))


def test_running_batch_norm_mode_tracks_and_uses_running_statistics():
    learner = conv_learner(inner_steps=1, bn="running")
    bn = learner.model.body.features[0][1]
    tasks = conv_tasks()
    learner.train()
    learner.meta_loss(tasks)[0].backward()
    assert int(bn.num_batches_tracked) == 1 and not torch.equal(bn.running_mean, torch.zeros(4))
    # Evaluation normalises with the running statistics: the same as the module in eval mode.
    learner.eval()
    out = learner.adapt_trajectory(tasks.support_x, tasks.support_y, 0)[0](tasks.query_x)
    ref = torch.stack([learner.model(tasks.query_x[t]) for t in range(T)])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # ... unlike transductive mode, which uses each task's query statistics.
    learner.bn = "transductive"
    learner.full.bn_mode = learner.body_fn.bn_mode = learner.head_fn.bn_mode = "transductive"
    out_t = learner.adapt_trajectory(tasks.support_x, tasks.support_y, 0)[0](tasks.query_x)
    assert (out_t - ref).abs().max() > 1e-3


def test_evaluation_mode_is_first_order_and_keeps_no_graph():
    learner = conv_learner(inner_steps=2, inner_steps_eval=2)
    tasks = conv_tasks()
    learner.eval()
    out = learner.adapt_tasks(tasks.support_x, tasks.support_y, W)(tasks.query_x)
    learner.train()
    ref = learner.adapt_trajectory(tasks.support_x, tasks.support_y, 2)[2](tasks.query_x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert out.grad_fn is None


def test_batched_and_per_task_loop_agree_in_float32():
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    body = Conv4(1, 8, 2, 12)
    tasks = TaskBatch(torch.randn(4, 5, 1, 12, 12), torch.arange(5).repeat(4, 1),
                      torch.randn(4, 10, 1, 12, 12), torch.arange(5).repeat_interleave(2).repeat(4, 1), 5)
    grads = []
    for backend, cl in (("reference", False), ("fast", False), ("fast", True)):
        learner = GradientLearner(body, nn.Linear(body.out_features, 5), 3, ways=5, inner_steps=2, backend=backend,
                                  channels_last=cl)
        torch.manual_seed(1)
        learner.model.head.reset_parameters()
        grads.append(library_meta_grad(learner, tasks))
    assert rel_err(grads[1], grads[0]) < 1e-4 and rel_err(grads[2], grads[0]) < 1e-4


def test_mlp_regression_maml_matches_unrolled_loop():
    torch.manual_seed(0)
    learner = GradientLearner(MLP(1, (8, 8)), nn.Linear(8, 1), 1, inner_steps=2, inner_lr=0.01)
    g = torch.Generator().manual_seed(0)
    tasks = TaskBatch(torch.randn(T, 5, 1, generator=g), torch.randn(T, 5, generator=g),
                      torch.randn(T, 7, 1, generator=g), torch.randn(T, 7, generator=g))
    model, theta = learner.model, dict(learner.model.named_parameters())
    total = 0.0
    for t in range(T):
        fast = dict(theta)
        for _ in range(2):
            out = functional_call(model, fast, (tasks.support_x[t],))[:, 0]
            g_ = torch.autograd.grad(F.mse_loss(out, tasks.support_y[t]), list(fast.values()), create_graph=True)
            fast = {n: v - 0.01 * gi for (n, v), gi in zip(fast.items(), g_)}
        total = total + F.mse_loss(functional_call(model, fast, (tasks.query_x[t],))[:, 0], tasks.query_y[t])
    ref = torch.autograd.grad(total / T, list(theta.values()))
    ref = {"model." + n: r for n, r in zip(theta, ref)}
    assert rel_err(library_meta_grad(learner, tasks), ref) < 1e-8


def test_wrong_ways_and_bad_options_give_clear_errors():
    learner = conv_learner()
    tasks = conv_tasks()
    with pytest.raises(MetamapError, match="3-way tasks only"):
        learner.adapt_tasks(tasks.support_x[:, :2], tasks.support_y[:, :2] % 2, 2)
    with pytest.raises(ConfigError, match="no parameter named"):
        conv_learner(adapt=["body.nothing"])
    with pytest.raises(ConfigError, match="bn"):
        conv_learner(bn="batch")
    with pytest.raises(ConfigError, match="inner_steps"):
        conv_learner(inner_steps=-1)


@pytest.mark.parametrize("cpp", [False, True])
def test_fused_bn_relu_pool_handles_negative_gammas_exactly(cpp):
    # Half the batch-norm scales negative: those channels must min-pool, in both layouts, in the
    # PyTorch block and in the C++ kernel (where it builds).
    from metamap.nets import kernels
    fused = "bn_relu_pool_cpp" if cpp and kernels.bn_relu_pool_available() else "bn_relu_pool"
    for adapt in ("all", "head"):
        learner = conv_learner(inner_steps=2, adapt=adapt, cpp_kernels=cpp)
        assert fused in learner.full.kinds()
        with torch.no_grad():
            for m in learner.model.body.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.copy_(torch.linspace(-1.5, 1.5, m.num_features))
                    m.bias.normal_()
        tasks = conv_tasks()
        names = None if adapt == "all" else ["head.weight", "head.bias"]
        assert rel_err(library_meta_grad(learner, tasks), unrolled_meta_grad(learner, tasks, 2, 0.4, names)) < 1e-8
        unfused = conv_learner(inner_steps=2, adapt=adapt, fuse_bn_pool=False, cpp_kernels=cpp)
        unfused.load_state_dict(learner.state_dict())
        assert not {"bn_relu_pool", "bn_relu_pool_cpp"} & set(unfused.full.kinds())
        assert rel_err(library_meta_grad(unfused, tasks), library_meta_grad(learner, tasks)) < 1e-8


def saved_bytes(learner: GradientLearner, tasks: TaskBatch) -> int:
    """Bytes of the tensors autograd keeps for the meta-backward pass (outside recomputed regions)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    learner.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        learner.meta_loss(tasks)
    return total


@pytest.mark.parametrize(("kw", "backend"), [({}, "fast"), ({}, "reference"), ({"step_sizes": "per_element"}, "fast"),
                                             ({"adapt": "head"}, "fast"),
                                             ({"multi_step_loss": True, "step_sizes": "per_layer_per_step"}, "fast")])
def test_gradient_checkpointing_gives_the_same_meta_gradient(kw, backend):
    plain = conv_learner(inner_steps=3, inner_lr=0.3, backend=backend, **kw)
    recomputed = conv_learner(inner_steps=3, inner_lr=0.3, backend=backend, grad_checkpoint=True, **kw)
    tasks = conv_tasks()
    ref = library_meta_grad(plain, tasks)
    assert rel_err(library_meta_grad(recomputed, tasks), ref) < 1e-12
    if not kw and backend == "fast":
        assert rel_err(unrolled_meta_grad(plain, tasks, 3, 0.3), ref) < 1e-8


def test_gradient_checkpointing_keeps_only_step_boundaries():
    tasks = conv_tasks()
    kept = {steps: (saved_bytes(conv_learner(inner_steps=steps), tasks),
                    saved_bytes(conv_learner(inner_steps=steps, grad_checkpoint=True), tasks))
            for steps in (1, 4)}
    # Without recomputation the graph grows with every inner step; with it, only each step's
    # weights are kept, a small fraction of the activations.
    assert kept[4][0] > 2.5 * kept[1][0]
    assert kept[4][1] < 0.1 * kept[4][0]
    assert kept[1][1] < 0.25 * kept[1][0]


@pytest.mark.parametrize("channels", [1, 3])
def test_batch_norm_folded_into_first_convolution_is_the_same_function(channels):
    from metamap.nets.backend import BackendOptions, make_backend
    torch.manual_seed(0)
    model = nn.Sequential(Conv4(in_channels=channels, hidden=4, layers=2, image_size=8), nn.Linear(16, W))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.linspace(-1.5, 1.5, m.num_features))
                m.bias.normal_()
    # Per-task weights (as after an inner step) so the convolutions run grouped.
    params = {n: (p.detach().expand(T, *p.shape) + 0.1 * torch.randn(T, *p.shape)).requires_grad_()
              for n, p in model.named_parameters()}
    x = torch.randn(T, 5, channels, 8, 8)
    outs, records, grads = [], [], []
    for fold in (True, False):
        record = {}
        out = make_backend(model, options=BackendOptions(channels_last=True, fold_bn=fold))(params, x, True, record)
        outs.append(out)
        records.append(record)
        grads.append(torch.autograd.grad((out ** 2).sum(), list(params.values()), allow_unused=True))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    assert records[0].keys() == records[1].keys() == {"0.features.0.1", "0.features.1.1"}
    for name in records[0]:
        for a, b in zip(records[0][name], records[1][name]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(params, *grads):
        if name == "0.features.0.0.bias":
            # Batch norm cancels the bias before it; folded, it drops out of the graph.
            assert a is None and float(b.abs().max()) < 1e-12
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kw", [{}, {"first_order": True}, {"adapt": "head"}])
def test_zero_head_keeps_the_head_at_zero_after_every_outer_step(kw):
    learner = conv_learner(zero_head=True, inner_steps=1, **kw)
    head = learner.model.head
    assert all(bool((p == 0).all()) for p in head.parameters())          # zero at initialisation
    opt = torch.optim.Adam(learner.parameters(), lr=1e-2)
    body_before = [p.detach().clone() for p in learner.model.body.parameters()]
    for seed in (1, 2):
        opt.zero_grad()
        loss, _ = learner.meta_loss(conv_tasks(seed))
        loss.backward()
        # The head still gets a meta-gradient (its update is then undone), the body learns.
        assert float(head.weight.grad.abs().sum()) > 0
        opt.step()
        assert float(head.weight.detach().abs().sum()) > 0
        learner.after_step()
        assert all(bool((p == 0).all()) for p in head.parameters())
    changed = [not torch.equal(a, b) for a, b in zip(body_before, learner.model.body.parameters())]
    assert any(changed)
    # Adaptation from the zero head: one inner step from zero logits gives the closed form
    # -lr * grad = lr * features^T (onehot - 1/ways) / S for the head's weights.
    learner.eval()
    tasks = conv_tasks(3)
    history, _ = learner._adapt(tasks.support_x, tasks.support_y, 1, False)
    if "adapt" in kw:
        with torch.no_grad():
            feats = learner.model.body.train()(tasks.support_x[0])     # the task's batch statistics
        onehot = F.one_hot(tasks.support_y[0], W).double()
        expected = 0.4 * (onehot - 1.0 / W).T @ feats / S              # inner_lr 0.4
        assert torch.allclose(history[1]["head.weight"][0], expected, atol=1e-10)


def test_zero_head_option_is_checked():
    with pytest.raises(ConfigError, match="zero_head"):
        conv_learner(zero_head="yes")


def test_inner_mini_batches_apply_in_training_and_inner_batch_eval_at_evaluation():
    mini, tasks = quadratic(steps=3, lr=0.05, inner_batch=2, inner_batch_eval=0)
    full, _ = quadratic(steps=3, lr=0.05)
    for learner in (mini, full):
        learner.inner_steps_eval = 3
    mini.eval(), full.eval()
    a = mini.adapt_tasks(tasks.support_x, tasks.support_y, 0)(tasks.query_x)
    torch.testing.assert_close(a, full.adapt_tasks(tasks.support_x, tasks.support_y, 0)(tasks.query_x),
                               rtol=0, atol=0)
    mini.train(), full.train()
    assert rel_err(library_meta_grad(mini, tasks), library_meta_grad(full, tasks)) > 1e-3


def test_an_inner_mini_batch_larger_than_the_support_set_is_the_whole_set_with_a_warning():
    """learner.inner_batch(_eval) = 100000 over 5 support examples: every inner step uses each of the
    5 once, exactly as inner_batch = 5 does (no example dealt twice, no 100000-row gather), said once."""
    whole, tasks = quadratic(steps=3, lr=0.05, inner_batch=5, inner_batch_eval=5, seed=2)
    big, _ = quadratic(steps=3, lr=0.05, inner_batch=100000, inner_batch_eval=100000, seed=2)
    for learner in (whole, big):
        learner.inner_steps_eval = 3
    with pytest.warns(UserWarning, match=r"learner.inner_batch = 100000 is more than the 5 support examples of a "
                                         r"task: each inner step uses all 5") as caught:
        got = library_meta_grad(big, tasks)
        library_meta_grad(big, tasks)                  # said once
    assert len(caught) == 1
    want = library_meta_grad(whole, tasks)
    assert all(torch.equal(got[n], want[n]) for n in want)
    big.eval(), whole.eval()
    with pytest.warns(UserWarning, match="learner.inner_batch_eval = 100000 is more than the 5 support examples"):
        out = big.adapt_tasks(tasks.support_x, tasks.support_y, 0)(tasks.query_x)
    assert torch.equal(out, whole.adapt_tasks(tasks.support_x, tasks.support_y, 0)(tasks.query_x))
    # Below the support size a mini-batch stays one (4 of the 5 per step: another meta-gradient).
    assert not torch.equal(library_meta_grad(quadratic(steps=3, lr=0.05, inner_batch=4, seed=2)[0], tasks)
                           ["model.head.weight"], want["model.head.weight"])


def test_adam_state_carried_across_tasks_as_in_reptiles_code():
    """With inner_state = carried, task 2's inner Adam continues from the moments and step count
    task 1 ended with (one task per chunk: the sequential recipe); evaluation starts from them and
    leaves them alone; the buffers are part of the learner's state (checkpoints)."""
    lr, b2, eps = 0.01, 0.999, 1e-8
    learner, tasks = quadratic(steps=2, lr=lr, cls=Reptile, inner_optimizer="adam", inner_state="carried")
    theta = learner.model.head.weight.detach()[0].clone()
    opt = learner.inner_optimizer
    assert {"count", "v__head__weight", "m__head__weight"} <= {k.split(".")[-1] for k in learner.state_dict()}
    v, count, expected = torch.zeros(4), 0, []
    for t in range(2):                         # by hand: two tasks one after the other
        phi = theta.clone()
        for _ in range(2):
            g = grad_mse(phi, tasks.support_x[t], tasks.support_y[t])
            v, count = b2 * v + (1 - b2) * g * g, count + 1
            phi = phi - lr * g / ((v / (1 - b2 ** count)).sqrt() + eps)
        expected.append(theta - phi)
    learner.train()
    for t in range(2):
        learner.zero_grad(set_to_none=True)
        learner.meta_backward(tasks.task(t), MetaGradient())
        torch.testing.assert_close(learner.model.head.weight.grad[0], expected[t], rtol=1e-12, atol=1e-12)
    assert int(opt.count) == 4
    torch.testing.assert_close(opt.v__head__weight[0], v, rtol=1e-12, atol=1e-15)
    saved = {k: b.clone() for k, b in opt.named_buffers()}
    learner.eval()
    learner.adapt_tasks(tasks.support_x, tasks.support_y, 0)(tasks.query_x)
    assert all(torch.equal(saved[k], b) for k, b in opt.named_buffers())
    with pytest.raises(ConfigError, match="needs learner.inner_optimizer"):
        quadratic(cls=Reptile, inner_state="carried")


@pytest.mark.parametrize("name", ["maml", "anil", "reptile"])
def test_a_backbone_returning_feature_maps_is_refused_for_gradient_learners(name):
    """Feature maps are for Relation Networks; a gradient learner's linear head needs flat features
    (found by the fuzzer: a shape error in the first inner step)."""
    from metamap.errors import ConfigError
    from tests.learner_helpers import learner
    with pytest.raises(ConfigError, match="model.feature_maps = false"):
        learner(name, "model.feature_maps=true")
    learner(name, "model.feature_maps=false")
