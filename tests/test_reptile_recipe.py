"""Reptile's recipe (Nichol et al. 2018): its defaults, the linear outer annealing, non-transductive
evaluation, and a short run on real data that must beat its own untrained evaluation."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from metamap import config
from metamap.algorithms.gradient import GradientLearner
from metamap.errors import ConfigError
from metamap.nets.backbones import Conv4
from metamap.train.schedule import lr_factor


def test_linear_schedule_anneals_from_one_to_the_floor():
    cfg = {"name": "linear", "min_lr": 0.0}
    assert [lr_factor(i, 4, cfg, base_lr=1.0) for i in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    floor = {"name": "linear", "min_lr": 0.1}          # down to min_lr / lr = 0.2
    assert lr_factor(2, 4, floor, base_lr=0.5) == pytest.approx(1 - 0.8 * 0.5)
    warm = {"name": "linear", "warmup": 2}
    assert [lr_factor(i, 6, warm, base_lr=1.0) for i in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]


def test_reptile_defaults_are_the_papers_recipe():
    c = config.resolve(None, ["learner.name=reptile"])
    learner = c["learner"]
    assert (learner["inner_optimizer"], learner["inner_lr"], learner["inner_beta1"]) == ("adam", 1e-3, 0.0)
    # One Adam for all tasks in their code: its moments and step count run on from task to task.
    assert learner["inner_state"] == "carried"
    assert (learner["inner_steps"], learner["inner_batch"]) == (5, 10)
    assert (learner["inner_steps_eval"], learner["inner_batch_eval"]) == (50, 5)
    # Training tasks have 10 shots per class, evaluation 1: separate settings.
    assert c["episode"]["shots"] == 10 and c["eval"]["shots"] == [1] and c["episode"]["tasks_per_batch"] == 5
    assert (c["optim"]["name"], c["optim"]["lr"], c["schedule"]["name"], c["schedule"]["min_lr"]) == \
        ("sgd", 1.0, "linear", 0.0)


def bn_learner(**kw) -> GradientLearner:
    torch.manual_seed(0)
    body = Conv4(in_channels=1, hidden=4, layers=2, image_size=8)
    return GradientLearner(body, nn.Linear(body.out_features, 3), 3, ways=3, channels_last=False,
                           inner_steps_eval=2, cpp_kernels=False, **kw)


def test_non_transductive_evaluation_classifies_each_query_with_the_support_set_alone():
    g = torch.Generator().manual_seed(0)
    support_x, support_y = torch.randn(2, 3, 1, 8, 8, generator=g), torch.arange(3).repeat(2, 1)
    query_x = torch.randn(2, 4, 1, 8, 8, generator=g)
    learner = bn_learner(transductive=False).eval()
    out = learner.adapt_tasks(support_x, support_y, 3)(query_x)
    # By hand: adapt, then query j of task t in a batch of task t's support set plus that query.
    history, fwd = learner._adapt(support_x, support_y, 2, False)
    final = history[-1]
    for t in range(2):
        params = {n: v[t:t + 1] if v.dim() == learner.model.get_parameter(n).dim() + 1 else v
                  for n, v in final.items()}
        for j in range(4):
            batch = torch.cat([support_x[t], query_x[t, j:j + 1]]).unsqueeze(0)
            torch.testing.assert_close(out[t, j], fwd(params, batch)[0, -1])
    # A query's prediction does not depend on the other queries; transductively it does.
    other = query_x.clone()
    other[:, 1:] = torch.randn(2, 3, 1, 8, 8, generator=g)
    torch.testing.assert_close(learner.adapt_tasks(support_x, support_y, 3)(other)[:, 0], out[:, 0])
    transductive = bn_learner().eval()
    a = transductive.adapt_tasks(support_x, support_y, 3)(query_x)[:, 0]
    b = transductive.adapt_tasks(support_x, support_y, 3)(other)[:, 0]
    assert not torch.allclose(a, b)
    with pytest.raises(ConfigError, match="transductive"):
        bn_learner(transductive="no")


@pytest.mark.integration
@pytest.mark.timeout(900)       # about a CPU-minute: several times that in wall time on a busy machine
def test_short_reptile_run_improves_on_its_own_untrained_evaluation(tmp_path):
    """300 meta-batches of the paper's recipe on Omniglot (a 16-channel Conv-4) lift 5-way 1-shot
    validation accuracy well above the untrained network's under the same 50-step evaluation:
    42.3 % -> 66.4 %. With the inner Adam reset for every task it reached 51.1 % (and on the
    Vinyals split at full width it peaked after 1,000 meta-batches and fell); the recipe before
    that (5 full-batch SGD steps of 0.1 on the 1-shot support set) went from 64 % to 58 %."""
    from metamap.train import checkpoint
    from metamap.train.evaluate import evaluate
    from metamap.train.run import build, train
    cfg = config.resolve(None, ["learner.name=reptile", "model.hidden=16", "train.steps=300", "train.val_every=0",
                                "train.report=false", "train.threads=1", "train.precision=fp32",
                                "learner.cpp_kernels=false"])
    source, _, untrained = build(cfg)
    sampler = source.sampler(cfg, "val", 5, 1, 5, 1, 7)
    before = evaluate(untrained, sampler, 60, progress=False).mean
    train(cfg, tmp_path / "run", run_test=False, progress=False, echo=lambda *a: None)
    trained = checkpoint.load_learner(tmp_path / "run" / "last").learner
    after = evaluate(trained, sampler, 60, progress=False).mean
    assert after > before + 0.15, (before, after)


def test_every_reproduce_config_resolves_and_names_its_targets():
    from pathlib import Path
    sys_path = Path(__file__).resolve().parents[1]
    configs = sorted((sys_path / "configs" / "reproduce").glob("*.toml"))
    assert len(configs) >= 20
    import importlib.util
    spec = importlib.util.spec_from_file_location("reproduce", sys_path / "benchmarks" / "reproduce.py")
    reproduce = importlib.util.module_from_spec(spec)
    import sys
    sys.path.insert(0, str(sys_path / "benchmarks"))
    spec.loader.exec_module(reproduce)
    for path in configs:
        c = config.resolve(path)
        assert c["data"]["split"] == "vinyals", path
        assert c["train"]["val_every"] > 0 and c["eval"]["episodes"] == 1000, path
        if not path.stem.startswith("finetune"):
            assert reproduce.targets_of(path), path
        if c["learner"]["name"] == "reptile":
            assert (c["learner"]["inner_optimizer"], c["learner"]["inner_state"]) == ("adam", "carried"), path


def test_reptiles_inner_adam_runs_on_across_tasks_so_small_gradients_take_small_steps():
    """The authors' code keeps one inner Adam for all tasks (``inner_state = "carried"``, Reptile's
    default): after a task with large gradients, a task whose gradients are about 1000 times
    smaller moves the weights about 1000 times less. Reset for every task, Adam's first step is
    ``lr * g / (|g| + eps)``, a full step of ``lr`` for every weight whatever its gradient -- the
    recipe under which Omniglot validation peaked after 1,000 meta-batches and then fell."""
    import metamap
    from metamap.algorithms.base import MetaGradient
    from metamap.tasks.batch import TaskBatch
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 8, 4, generator=g)
        lr, b2, eps = 1e-3, 0.999, 1e-8

        def learner(**kw):
            torch.manual_seed(0)
            return metamap.Reptile(nn.Linear(4, 1, bias=False), example_shape=(4,), inner_steps=1,
                                   inner_batch=0, **kw).train()
        theta = learner().model.body.weight.detach()[0].clone()
        big = x[0] @ torch.randn(4, generator=g) * 3                  # far from theta: gradients ~ 1
        small = x[1] @ theta + 1e-3 * torch.randn(8, generator=g)     # nearly fit: gradients ~ 1e-3

        def grad(xs, ys):                                             # of mean((xs theta - ys)^2)
            return 2.0 / xs.shape[0] * xs.T @ (xs @ theta - ys)
        g_big, g_small = grad(x[0], big), grad(x[1], small)
        assert float(g_small.abs().max()) < 0.01 * float(g_big.abs().min())

        def reptile_steps(l):
            out = []
            for xs, ys in ((x[0], big), (x[1], small)):               # two meta-batches of one task each
                l.zero_grad(set_to_none=True)
                tasks = TaskBatch(xs[None], ys[None], xs[None], ys[None])
                l.meta_backward(tasks, MetaGradient())
                out.append(l.model.body.weight.grad[0].clone())      # theta - phi
            return out
        carried = learner()
        assert carried.inner_optimizer.carried                        # the default
        step_big, step_small = reptile_steps(carried)
        # By hand: Adam (beta1 = 0) with its second moment and step count running on.
        v1 = (1 - b2) * g_big ** 2
        torch.testing.assert_close(step_big, lr * g_big / ((v1 / (1 - b2)).sqrt() + eps), rtol=1e-12, atol=0)
        v2 = b2 * v1 + (1 - b2) * g_small ** 2
        # (atol: theta - phi loses digits to cancellation when phi is this close to theta)
        torch.testing.assert_close(step_small, lr * g_small / ((v2 / (1 - b2 ** 2)).sqrt() + eps),
                                   rtol=1e-12, atol=1e-15)
        assert float(step_small.norm()) < 0.01 * float(step_big.norm())
        # Reset for every task: the small task moves every weight by (almost exactly) lr.
        _, reset_small = reptile_steps(learner(inner_state="reset"))
        torch.testing.assert_close(reset_small, lr * g_small / (g_small.abs() + eps), rtol=1e-12, atol=1e-15)
        assert float(reset_small.abs().min()) > 0.99 * lr
    finally:
        torch.set_default_dtype(old)
