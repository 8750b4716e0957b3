"""The optional C++ first-layer kernel: same values and gradients as the PyTorch layers, used only
where a single backward pass follows, and a clean fallback when it cannot be compiled."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metamap.algorithms.gradient import GradientLearner
from metamap.nets import kernels
from metamap.nets.backbones import Conv4
from metamap.tasks.batch import TaskBatch

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                    reason="no C++ compiler on this machine")


def reference(x, w, b, pad):
    n, t, cin, h, wd = x.shape
    c = w.shape[1]
    y = F.conv2d(x.reshape(n, t * cin, h, wd), w.reshape(t * c, *w.shape[2:]), b.reshape(-1), padding=pad, groups=t)
    return F.relu(F.max_pool2d(y, 2))


@needs_compiler
@pytest.mark.parametrize(("t", "cin", "size", "c", "k", "pad"),
                         [(2, 1, 28, 64, 3, 1), (3, 1, 9, 5, 3, 1), (1, 3, 8, 20, 3, 0), (2, 2, 11, 17, 5, 2)])
def test_conv_pool_relu_matches_pytorch_layers(t, cin, size, c, k, pad):
    assert kernels.available(), "the C++ kernel failed to compile (see the warning)"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, t, cin, size, size, generator=g, dtype=torch.float64)
    w = torch.randn(t, c, cin, k, k, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(t, c, generator=g, dtype=torch.float64, requires_grad=True)
    out, ref = kernels.conv_pool_relu(x, w, b, pad), reference(x, w, b, pad)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, (w, b), grad)
    want = torch.autograd.grad(ref, (w, b), grad)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@needs_compiler
def test_second_derivatives_match_and_third_is_refused():
    assert kernels.available()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 1, 8, 8, generator=g, dtype=torch.float64)
    w = torch.randn(2, 5, 1, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 10, 4, 4, generator=g, dtype=torch.float64)

    def hvp(layer):
        # A non-linear loss of the layer's output, its gradient, then the gradient of a
        # function of that gradient: MAML's pattern (the loss makes the Hessian non-zero).
        y = layer(x, w, b, 1)
        gw, gb = torch.autograd.grad((torch.tanh(y) * v).sum(), (w, b), create_graph=True)
        return torch.autograd.grad((gw ** 2).sum() + (gb * b).sum(), (w, b))
    for a, e in zip(hvp(kernels.conv_pool_relu), hvp(reference)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    y = kernels.conv_pool_relu(x, w, b, 1)
    (gw,) = torch.autograd.grad((y ** 2).sum(), w, create_graph=True)
    # A graph of the second derivative (for a third) is refused rather than silently wrong.
    with pytest.raises(RuntimeError, match="differentiable twice, not three times"):
        torch.autograd.grad((gw ** 2).sum(), w, create_graph=True)



@needs_compiler
@pytest.mark.parametrize(("t", "cin", "size", "c", "pad"), [(2, 1, 28, 64, 1), (3, 1, 9, 5, 1), (2, 2, 11, 17, 0)])
def test_wide_pass_takes_the_double_decisions(t, cin, size, c, pad):
    """float32 images with a float64 kernel: the output is the float64 computation rounded once, so
    the pooling winners and ReLU signs are float64's; the gradients arrive in float64."""
    assert kernels.available()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, t, cin, size, size, generator=g)
    w = torch.randn(t, c, cin, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(t, c, generator=g, dtype=torch.float64, requires_grad=True)
    out = kernels.conv_pool_relu(x, w, b, pad)
    exact = kernels.conv_pool_relu(x.double(), w, b, pad)
    assert out.dtype == torch.float32
    assert torch.equal(out, exact.float())
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, (w, b), grad.float())
    want = torch.autograd.grad(exact, (w, b), grad)
    for a, e in zip(got, want):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-4)   # the backward pass runs in float32


@needs_compiler
def test_wide_pass_second_derivatives_match_float64():
    assert kernels.available()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 2, 1, 8, 8, generator=g)
    w = torch.randn(2, 32, 1, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 32, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 64, 4, 4, generator=g, dtype=torch.float64)

    def hvp(images):
        y = kernels.conv_pool_relu(images, w, b, 1)
        gw, gb = torch.autograd.grad((torch.tanh(y.double()) * v).sum(), (w, b), create_graph=True)
        return torch.autograd.grad((gw ** 2).sum() + (gb * b).sum(), (w, b))
    for a, e in zip(hvp(x), hvp(x.double())):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


@needs_compiler
def test_learner_runs_the_first_layer_wide_on_float32(monkeypatch):
    dtypes = []
    real = kernels.conv_pool_relu
    monkeypatch.setattr(kernels, "conv_pool_relu", lambda x, w, b, p: dtypes.append((x.dtype, w.dtype)) or real(x, w, b, p))
    model = learner(True).train()
    batch = tasks()
    batch = TaskBatch(batch.support_x.float(), batch.support_y, batch.query_x.float(), batch.query_y, 3)
    loss, _ = model.meta_loss(batch)
    loss.backward()
    assert dtypes == [(torch.float32, torch.float64)] * 3
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


def learner(cpp: bool) -> GradientLearner:
    torch.manual_seed(0)
    body = Conv4(in_channels=1, hidden=8, layers=2, image_size=12)
    return GradientLearner(body, nn.Linear(body.out_features, 3), 3, ways=3, inner_steps=2, cpp_kernels=cpp)


def tasks() -> TaskBatch:
    g = torch.Generator().manual_seed(1)
    return TaskBatch(torch.randn(2, 3, 1, 12, 12, generator=g, dtype=torch.float64), torch.arange(3).repeat(2, 1),
                     torch.randn(2, 6, 1, 12, 12, generator=g, dtype=torch.float64),
                     torch.arange(3).repeat_interleave(2).repeat(2, 1), 3)


@needs_compiler
@pytest.mark.parametrize("first_order", [False, True])
def test_learner_with_and_without_the_kernel_agree(first_order, monkeypatch):
    calls = []
    real = kernels.conv_pool_relu
    monkeypatch.setattr(kernels, "conv_pool_relu", lambda *a: calls.append(1) or real(*a))
    grads = []
    for cpp in (True, False):
        model = learner(cpp).double()
        model.first_order = first_order
        model.train()
        loss, _ = model.meta_loss(tasks())
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert len(calls) == 3                      # two inner steps and the query pass

    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-9, atol=1e-12)


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    import torch.utils.cpp_extension as ext

    def broken(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")
    monkeypatch.setattr(ext, "load", broken)
    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(kernels, "_modules", {})
    monkeypatch.setattr(kernels, "_failures", {})
    # The kernel is built when the learner's backend is made, not inside a forward pass.
    with pytest.warns(RuntimeWarning, match="could not compile its C\\+\\+ kernel.*Ninja is required"):
        model = learner(True).double().train()
    assert "conv_bn_relu_pool_cpp" not in model.full.kinds() and "conv_bn" in model.full.kinds()
    loss, _ = model.meta_loss(tasks())
    loss.backward()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # the warning is not repeated
        learner(True).double().train().meta_loss(tasks())
    assert not kernels.available() and "Ninja is required" in kernels.failure()


@needs_compiler
def test_kernel_is_built_with_the_backend_never_in_a_forward_pass(monkeypatch):
    assert kernels.build() is not None
    calls = []
    monkeypatch.setattr(kernels, "build", lambda *a, **k: calls.append(1) or kernels._module)
    from metamap.nets.backbones import MLP
    GradientLearner(MLP(1, (8,)), nn.Linear(8, 1), 1)            # nothing for the kernel to run
    assert calls == []
    model = learner(True).double().train()
    assert calls and "conv_bn_relu_pool_cpp" in model.full.kinds()
    built = len(calls)
    model.meta_loss(tasks())[0].backward()
    model.eval()
    model.adapt_tasks(tasks().support_x, tasks().support_y, 3)(tasks().query_x)
    assert len(calls) == built


@pytest.mark.integration
def test_build_kernels_command(capsys):
    from metamap.cli import main
    code = main(["build-kernels"])
    out = capsys.readouterr()
    kernels.build()
    if kernels.failure() is None:
        assert code == 0 and "built" in out.out
    else:
        assert code == 2 and "could not" in out.err


def bn_relu_pool_reference(z, gamma, beta, eps):
    return F.relu(F.max_pool2d(F.batch_norm(z, None, None, gamma, beta, True, 0.0, eps), 2))


@needs_compiler
@pytest.mark.parametrize(("n", "k", "size"), [(5, 12, 7), (4, 8, 6), (3, 6, 3), (2, 16, 14)])
def test_bn_relu_pool_matches_pytorch_layers(n, k, size):
    assert kernels.bn_relu_pool_available(), "the C++ kernel failed to compile (see the warning)"
    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, k, size, size, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    z.requires_grad_()
    # Negative scales pool the minimum. (At gamma = 0 exactly the layers' d/dgamma depends on how
    # ties are broken; the kernel, like TaskBatchedNet's fused block, takes the limit gamma -> 0+.)
    gamma = torch.randn(k, generator=g, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(k, generator=g, dtype=torch.float64, requires_grad=True)
    y, mean, rstd = kernels.bn_relu_pool(z, gamma, beta, 1e-5)
    ref = bn_relu_pool_reference(z, gamma, beta, 1e-5)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(mean, z.mean((0, 2, 3)).detach(), rtol=1e-12, atol=1e-12)
    var = z.var((0, 2, 3), correction=0).detach()
    torch.testing.assert_close(rstd, (var + 1e-5).rsqrt(), rtol=1e-10, atol=1e-12)
    gy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    for a, e in zip(torch.autograd.grad(y, (z, gamma, beta), gy), torch.autograd.grad(ref, (z, gamma, beta), gy)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *a: kernels.bn_relu_pool(*a, 1e-5)[0], (z, gamma, beta))



@needs_compiler
def test_bn_relu_pool_centres_before_it_scales():
    """A float32 channel whose mean is far above its spread: the output is (z - mean) * scale + beta
    computed in double, so it errs by the output's own rounding, not by the mean's (the form
    scale * z + (beta - scale * mean) erred by 7.6e-5 here); its gradient stays within float32
    rounding of float64's."""
    assert kernels.bn_relu_pool_available()
    g = torch.Generator().manual_seed(7)
    z = (torch.randn(4, 16, 6, 6, generator=g) + 1000).contiguous(memory_format=torch.channels_last)
    gamma, beta = torch.rand(16, generator=g) + 0.5, torch.randn(16, generator=g) * 0.1
    y = kernels.bn_relu_pool(z, gamma, beta, 1e-5)[0]
    exact = bn_relu_pool_reference(z.double(), gamma.double(), beta.double(), 1e-5)
    torch.testing.assert_close(y.double(), exact, rtol=0, atol=2e-6)
    gy = torch.randn(exact.shape, generator=g)
    zz, z64 = z.clone().requires_grad_(), z.double().requires_grad_()
    (got,) = torch.autograd.grad(kernels.bn_relu_pool(zz, gamma, beta, 1e-5)[0], zz, gy)
    (want,) = torch.autograd.grad(bn_relu_pool_reference(z64, gamma.double(), beta.double(), 1e-5), z64, gy.double())
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)

@needs_compiler
def test_bn_relu_pool_second_derivatives_match_pytorch_layers():
    """Where a graph of its backward pass is built (MAML's inner steps) the kernel's gradients are
    differentiable again: Hessian-vector products equal the PyTorch layers'."""
    assert kernels.bn_relu_pool_available()
    g = torch.Generator().manual_seed(3)
    z = torch.randn(3, 6, 7, 7, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    gamma = torch.randn(6, generator=g, dtype=torch.float64)
    beta = torch.randn(6, generator=g, dtype=torch.float64)
    weights = torch.randn(3, 6, 3, 3, generator=g, dtype=torch.float64)
    v = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (z, gamma, beta)]

    def hvp(fn):
        args = [t.clone().requires_grad_() for t in (z, gamma, beta)]
        loss = (fn(*args) * weights).square().sum()
        grads = torch.autograd.grad(loss, args, create_graph=True)
        return torch.autograd.grad(sum((a * b).sum() for a, b in zip(grads, v)), args)
    for a, e in zip(hvp(lambda *a: kernels.bn_relu_pool(*a, 1e-5)[0]),
                    hvp(lambda *a: bn_relu_pool_reference(*a, 1e-5))):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11)
    args = [t.clone().requires_grad_() for t in (z, gamma, beta)]
    assert torch.autograd.gradgradcheck(lambda *a: kernels.bn_relu_pool(*a, 1e-5)[0], args)


@needs_compiler
@pytest.mark.parametrize(("n", "t", "size", "c"), [(5, 3, 28, 64), (4, 2, 9, 32), (3, 1, 12, 96), (2, 2, 10, 20)])
def test_float32_paths_match_float64(n, t, size, c):
    """Grey 3x3 layers in float32 take the vectorised paths (with AVX-512); they must agree with the
    float64 loops to float32 rounding, with the same pooling winners."""
    assert kernels.available()
    m = kernels._module
    g = torch.Generator().manual_seed(2)
    x = F.pad(torch.randn(n, t, 1, size, size, generator=g), (1,) * 4).contiguous()
    w, b = torch.randn(t, 9, c, generator=g), torch.randn(t, c, generator=g)
    out, idx = m.forward(x, w, b, 3, 3, 1)
    out64, idx64 = m.forward(x.double(), w.double(), b.double(), 3, 3, 1)
    torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-5)
    assert torch.equal(idx, idx64)
    grad = torch.randn(out.shape, generator=g)
    for a, e in zip(m.backward(grad, x, w, out, idx, 3, 3, 1),
                    m.backward(grad.double(), x.double(), w.double(), out.double(), idx, 3, 3, 1)):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-4)
    vw, vb = torch.randn(w.shape, generator=g), torch.randn(b.shape, generator=g)
    torch.testing.assert_close(m.masked_forward(x, vw, vb, out, idx, 3, 3, 1).double(),
                               m.masked_forward(x.double(), vw.double(), vb.double(), out.double(), idx, 3, 3, 1),
                               rtol=1e-5, atol=1e-5)


def _hold_lock(path, log, seconds):
    import time as clock

    from metamap.nets import kernels as k
    with k._file_lock(path):
        start = clock.monotonic()
        clock.sleep(seconds)
        with open(log, "a") as f:
            f.write(f"{start} {clock.monotonic()}\n")


@pytest.mark.integration
def test_processes_building_at_once_take_turns(tmp_path):
    """Two processes that build on a fresh cache at the same moment (the ranks of a distributed run)
    hold the build lock one after the other, never together."""
    import multiprocessing
    lock, log = tmp_path / "ext.lock", tmp_path / "log"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hold_lock, args=(lock, log, 0.5)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    (a0, a1), (b0, b1) = sorted(tuple(map(float, line.split())) for line in log.read_text().splitlines())
    assert a1 <= b0


def test_a_killed_builds_leftover_baton_does_not_hang_the_next_build(tmp_path, monkeypatch):
    """PyTorch waits forever while its `lock` file exists; a build killed mid-way leaves one. Under
    metamap's exclusive lock it is stale and removed. The source is compiled from a copy at a path
    that does not depend on the checkout, so two checkouts do not rebuild the shared cache in turn.
    The same holds for every kernel source."""
    import torch.utils.cpp_extension as ext
    dirs = {}
    for stem in kernels.SOURCES:
        name, _ = kernels.extension_name(stem)
        dirs[name] = tmp_path / name
        dirs[name].mkdir()
        (dirs[name] / "lock").touch()
    seen = {}

    def fake_load(name, sources, build_directory=None, **kwargs):
        seen[name] = dict(baton=(Path(build_directory) / "lock").exists(), sources=sources, dir=build_directory)
        return f"module {name}"
    monkeypatch.setattr(ext, "load", fake_load)
    monkeypatch.setattr(kernels, "_build_dir", lambda name, verbose: dirs[name])
    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(kernels, "_modules", {})
    monkeypatch.setattr(kernels, "_failures", {})
    first, _ = kernels.extension_name("conv_pool")
    assert kernels.build() == f"module {first}"
    assert seen.keys() == dirs.keys() and kernels.failure() is None
    for stem in kernels.SOURCES:
        name, _ = kernels.extension_name(stem)
        assert seen[name]["baton"] is False and seen[name]["dir"] == str(dirs[name])
        (source,) = seen[name]["sources"]
        assert Path(source).parent.parent == tmp_path
        assert Path(source).read_bytes() == Path(kernels.__file__).with_name(stem + ".cpp").read_bytes()


def test_the_cached_kernel_name_follows_the_source(tmp_path, monkeypatch):
    """Two versions of a kernel's source never share (and so never rebuild) one cached extension."""
    src = tmp_path / "conv_pool.cpp"
    src.write_text("// one version\n")
    monkeypatch.setattr(kernels, "_source", lambda stem: src)
    before, _ = kernels.extension_name("conv_pool")
    assert before == kernels.extension_name("conv_pool")[0]
    src.write_text("// another version\n")
    assert kernels.extension_name("conv_pool")[0] != before


@needs_compiler
def test_float32_gradient_sums_run_in_double():
    """The kernel's gradient sums over 80 images x 196 positions: accumulated in float32 they erred by
    5e-7 (relative), in double (products in float32) by 7e-8 -- against a bound of 2e-7."""
    assert kernels.available()
    m = kernels._module
    g = torch.Generator().manual_seed(0)
    x = F.pad(torch.randn(80, 2, 1, 28, 28, generator=g), (1,) * 4).contiguous()
    w, b = torch.randn(2, 9, 64, generator=g) * 0.3, torch.randn(2, 64, generator=g)
    out, idx = m.forward(x, w, b, 3, 3, 1)
    grad = torch.randn(out.shape, generator=g)
    exact = m.backward(grad.double(), x.double(), w.double(), out.double(), idx, 3, 3, 1)
    for a, e in zip(m.backward(grad, x, w, out, idx, 3, 3, 1), exact):
        assert float((a.double() - e).norm() / e.norm()) < 2e-7
