"""The fast backend computes what the reference backend computes, for every learner option.

Each case builds the same gradient-based learner twice, on ``learner.backend = "fast"`` and on
``"reference"`` (one ``functional_call`` per task), and compares in float64: the adapted
predictor's outputs at evaluation, the meta-gradient the trainer applies (``meta_backward``) and
the running statistics that a meta-batch records. The reference backend is itself checked
against hand-unrolled loops in tests/test_maml.py.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from metamap.algorithms.base import MetaGradient
from metamap.algorithms.gradient import GradientLearner, Reptile
from metamap.nets import kernels
from metamap.nets.backbones import MLP, Conv4
from metamap.nets.backend import BackendOptions, FastBackend, ReferenceBackend, make_backend
from metamap.nets.program import lower
from metamap.nets.resnet12 import ResNet12
from metamap.tasks.batch import TaskBatch

T, W = 2, 3


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def image_tasks(channels=1, size=8, seed=1) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(torch.randn(T, 2 * W, channels, size, size, generator=g), torch.arange(W).repeat(T, 2),
                     torch.randn(T, 2 * W, channels, size, size, generator=g), torch.arange(W).repeat(T, 2), W)


def regression_tasks(seed=2) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(torch.randn(T, 6, 1, generator=g), torch.randn(T, 6, generator=g),
                     torch.randn(T, 8, 1, generator=g), torch.randn(T, 8, generator=g))


def conv4():
    return Conv4(in_channels=1, hidden=4, layers=2, image_size=8)


def resnet():
    return ResNet12(in_channels=3, widths=(2, 2, 4, 4), image_size=16)


def build(body_fn, backend, cls=GradientLearner, out=W, example_dims=3, **options):
    torch.manual_seed(0)
    body = body_fn()
    learner = cls(body, nn.Linear(body.out_features, out), example_dims, ways=W if out == W else 0,
                  backend=backend, channels_last=options.pop("channels_last", False), **options)
    with torch.no_grad():       # batch-norm scales of both signs (the fused pooling min-pools those < 0)
        for m in learner.model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.linspace(-1.5, 1.5, m.num_features))
                m.bias.normal_()
    return learner


def meta_gradient(learner, tasks) -> dict[str, torch.Tensor]:
    learner.train()
    learner.zero_grad(set_to_none=True)
    learner.meta_backward(tasks, MetaGradient())
    return {n: (torch.zeros_like(p) if p.grad is None else p.grad.clone())
            for n, p in learner.named_parameters() if p.requires_grad}


def rel_err(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    x, y = torch.cat([a[k].flatten() for k in a]), torch.cat([b[k].flatten() for k in a])
    return float((x - y).norm() / y.norm())


def compare(body_fn, tasks, cls=GradientLearner, out=W, example_dims=3, **options):
    fast = build(body_fn, "fast", cls, out, example_dims, **dict(options))
    ref = build(body_fn, "reference", cls, out, example_dims,
                **{k: v for k, v in options.items() if k not in ("fold_bn", "fuse_bn_pool", "cpp_kernels")})
    assert fast.full.name == "fast" and ref.full.name == "reference"
    ga, gb = meta_gradient(fast, tasks), meta_gradient(ref, tasks)
    # A convolution bias right before batch norm has a true gradient of zero: the fast path's
    # folded layer drops it (exactly 0), the reference computes rounding noise around 0.
    assert rel_err(ga, gb) < 1e-8
    for (n, a), b in zip(fast.state_dict().items(), ref.state_dict().values()):      # running statistics
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=n)
    fast.eval(), ref.eval()
    with torch.set_grad_enabled(True):
        ya = fast.adapt_tasks(tasks.support_x, tasks.support_y, W)(tasks.query_x)
        yb = ref.adapt_tasks(tasks.support_x, tasks.support_y, W)(tasks.query_x)
    torch.testing.assert_close(ya, yb, rtol=1e-9, atol=1e-10)
    return fast, ref


LEARNER_OPTIONS = [
    {},
    {"inner_steps": 2, "first_order": True},
    {"adapt": "head"},
    {"adapt": ["body.features.1", "head"]},
    {"freeze": ["body.features.0.0"]},
    {"step_sizes": "per_layer_per_step", "inner_steps": 2, "multi_step_loss": True},
    {"step_sizes": "per_element"},
    {"inner_optimizer": "adam", "inner_lr": 0.01, "first_order": True, "inner_steps": 2},
    {"inner_batch": 4, "inner_batch_eval": 4, "inner_steps": 2},
    {"grad_checkpoint": True, "inner_steps": 2},
    {"bn": "running"},
    {"bn": "running", "adapt": "head"},
]
LEVERS = [
    {},
    {"fold_bn": False},
    {"fuse_bn_pool": False},
    {"cpp_kernels": False},
    {"fold_bn": False, "fuse_bn_pool": False, "channels_last": True},
]


def ids(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items()) or "defaults"


def sweep(cases: list[dict]) -> list:
    """The first case stays a unit test; the rest of the sweep (whole learners, meta-gradients of
    second order, on both backends: seconds each) runs with the integration tests."""
    return [cases[0], *(pytest.param(c, marks=pytest.mark.integration) for c in cases[1:])]


@pytest.mark.parametrize("options", sweep(LEARNER_OPTIONS), ids=ids)
def test_conv4_learner_options_agree_on_both_backends(options):
    fast, ref = compare(conv4, image_tasks(), inner_steps_eval=2, **options)
    if options.get("bn") == "running":
        # The reference backend records running statistics too (it once did not).
        bn = ref.model.body.features[0][1]
        assert int(bn.num_batches_tracked) == 1 and not torch.equal(bn.running_mean, torch.zeros(4))


@pytest.mark.parametrize("levers", sweep(LEVERS), ids=ids)
def test_every_rewrite_pass_setting_computes_the_same_function(levers):
    fast, _ = compare(conv4, image_tasks(), inner_steps=2, inner_steps_eval=2, bn="running", **levers)
    kinds = fast.full.kinds()
    assert ("conv_bn" in kinds or "conv_bn_relu_pool_cpp" in kinds) == levers.get("fold_bn", True)
    fused = levers.get("fuse_bn_pool", True)
    assert ("bn_relu_pool" in kinds or "bn_relu_pool_cpp" in kinds) == fused
    if kernels.bn_relu_pool_loaded():
        assert ("bn_relu_pool_cpp" in kinds) == (fused and levers.get("cpp_kernels", True))


@pytest.mark.integration
def test_reptile_agrees_on_both_backends():
    compare(conv4, image_tasks(), cls=Reptile, inner_steps=3, inner_lr=0.1)


@pytest.mark.parametrize("options", sweep([{"adapt": "head"}, {}, {"bn": "running"},
                                           {"adapt": ["body.blocks.0.conv1", "head"], "fold_bn": False}]),
                         ids=["head", "all", "running", "mixed-layouts"])
def test_resnet12_lowers_and_agrees_with_the_reference(options):
    assert lower(resnet()) is not None
    fast, _ = compare(resnet, image_tasks(channels=3, size=16), inner_steps=1, inner_steps_eval=1, **options)
    assert "add" in fast.full.kinds() and "mean_hw" in fast.full.kinds()


@pytest.mark.parametrize("options", [{}, {"step_sizes": "per_element", "inner_steps": 2},
                                     {"inner_optimizer": "adam", "inner_lr": 0.001, "first_order": True},
                                     {"inner_batch": 3}])
def test_mlp_regression_agrees_on_both_backends(options):
    compare(lambda: MLP(1, (8, 8)), regression_tasks(), out=1, example_dims=1, **{"inner_lr": 0.01, **options})


def test_a_module_that_does_not_lower_runs_on_the_reference_backend():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return torch.tanh(self.lin(x))

    model = nn.Sequential(Custom())
    assert lower(model) is None
    assert isinstance(make_backend(model), ReferenceBackend)
    assert isinstance(make_backend(nn.Sequential(nn.Linear(4, 3))), FastBackend)
    assert isinstance(make_backend(nn.Sequential(nn.Linear(4, 3)), options=BackendOptions("reference")),
                      ReferenceBackend)


def test_reference_backend_records_the_batch_statistics_the_fast_one_does():
    torch.manual_seed(0)
    model = nn.Sequential(conv4(), nn.Linear(16, W))
    params = {n: (p.detach().expand(T, *p.shape) + 0.1 * torch.randn(T, *p.shape)) for n, p in model.named_parameters()}
    x = torch.randn(T, 5, 1, 8, 8)
    records = []
    for backend in ("fast", "reference"):
        record = {}
        make_backend(model, bn_mode="running", options=BackendOptions(backend))(params, x, True, record)
        records.append(record)
    assert records[0].keys() == records[1].keys() == {"0.features.0.1", "0.features.1.1"}
    for name in records[0]:
        for a, b in zip(records[0][name], records[1][name]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # By hand for the first layer of task 0's share: the mean over examples and positions.
    first = torch.nn.functional.conv2d(x[0], params["0.features.0.0.weight"][0], params["0.features.0.0.bias"][0],
                                       padding=1)
    per_task = [torch.nn.functional.conv2d(x[t], params["0.features.0.0.weight"][t],
                                           params["0.features.0.0.bias"][t], padding=1).mean((0, 2, 3))
                for t in range(T)]
    assert first.shape[1] == 4
    torch.testing.assert_close(records[1]["0.features.0.1"][0], torch.stack(per_task).mean(0))
