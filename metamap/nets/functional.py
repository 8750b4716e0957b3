"""The fast backend's executor: a lowered network run with *per-task* weights, all tasks at once.

Gradient-based meta-learners give every task its own copy of the weights after the first
inner step. Looping over tasks runs ``T`` small networks one after another; here the tasks run
together instead:

* convolution feature maps live in a *grouped* layout ``[N, T*C, H, W]`` (task-major channels),
  so one ``conv2d(groups=T)`` applies every task's own kernels, and batch norm / ReLU /
  max-pool act per channel, i.e. per task, with no reshuffling between layers;
* layers whose weights are still shared by all tasks (ANIL's body, a frozen layer) run as one
  large batch ``[T*N, ...]`` -- the cheapest formulation there is;
* vectors with per-task weights live as ``[T, N, F]`` and use batched matmul.

A weight is *shared* when its shape equals the module parameter's shape and *per task* when it
has an extra leading ``T`` dimension. The network arrives lowered to operations
(:mod:`metamap.nets.program`) and rewritten by passes (:mod:`metamap.nets.passes`); each
operation kind has a runner here, and a fused operation whose pass says it does not apply to
the current input (:meth:`~metamap.nets.passes.RewritePass.applies`) runs its parts instead.

Batch norm is written out from mean / variance / rsqrt where statistics must be per task but the
layout is flat, and uses ``F.batch_norm`` in the grouped layout (one channel per task and
feature). Both give exact second-order gradients outside ``vmap`` (see the tests).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from metamap.nets.program import Op

BN_MODES = ("transductive", "running")


# -- batch norm written out: exact under any transformation ------------------------------------
def batch_norm_exact(x: Tensor, dims: tuple[int, ...], weight: Tensor | None, bias: Tensor | None,
                     eps: float) -> Tensor:
    """Normalise ``x`` with its mean and biased variance over ``dims`` (kept), then scale/shift.

    ``weight``/``bias`` must broadcast against ``x``. Differentiable to any order.
    """
    mean = x.mean(dims, keepdim=True)
    centred = x - mean
    var = (centred * centred).mean(dims, keepdim=True)
    y = centred * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def grouped_batch_norm(h: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Batch norm with the batch's statistics per channel of ``h [N, C, H, W]`` (``weight``/``bias [C]``).

    The native kernel, except under tracing (``metamap export``): the ONNX exporter writes batch
    statistics only for a fixed batch size, so the trace records the same function written out.
    """
    if not torch.jit.is_tracing():
        return F.batch_norm(h, None, None, weight, bias, True, 0.0, eps)
    per_channel = lambda v: None if v is None else v.reshape(1, -1, 1, 1)
    return batch_norm_exact(h, (0, 2, 3), per_channel(weight), per_channel(bias), eps)


@dataclass
class Run:
    """The state of one execution: the activation ``h`` in its layout, and what every runner needs.

    ``layout``: ``flat`` ``[T*N, ...]``, ``grouped`` ``[N, T*C, H, W]`` or ``tasks`` ``[T, N, F]``.
    ``record``, if given, receives each batch-norm layer's batch mean and unbiased variance
    averaged over tasks (detached), keyed by module name.
    """

    params: dict[str, Tensor]
    h: Tensor
    t: int
    n: int
    dims: dict[str, int]               # each parameter's own number of dimensions
    use_running_stats: bool = False
    channels_last: bool = False
    record: dict | None = None
    layout: str = "flat"

    def per_task(self, name: str | None) -> bool:
        return name is not None and self.params[name].dim() == self.dims[name] + 1

    def param(self, name: str | None) -> Tensor | None:
        return self.params[name] if name else None

    def grouped(self) -> None:
        """Switch a flat activation to the grouped layout."""
        if self.layout == "flat":
            self.h = to_grouped(self.h, self.t, self.channels_last)
            self.layout = "grouped"


Runner = Callable[[Op, Run], None]
RUNNERS: dict[str, Runner] = {}
# Fused kinds -> the rewrite pass that made them (it decides whether they apply, and runs them).
FUSED: dict[str, object] = {}


def runner(kind: str):
    def deco(fn: Runner) -> Runner:
        RUNNERS[kind] = fn
        return fn
    return deco


def execute(program: list[Op], params: dict[str, Tensor], x: Tensor, dims: dict[str, int],
            use_running_stats: bool = False, channels_last: bool = False, record: dict | None = None) -> Tensor:
    """``x [T, N, *example]`` -> ``[T, N, *output]`` through ``program``."""
    t, n = x.shape[:2]
    run = Run(params, x.reshape(t * n, *x.shape[2:]), t, n, dims, use_running_stats, channels_last, record)
    run_ops(program, run)
    return output(run)


def run_ops(ops: list[Op], run: Run) -> None:
    for op in ops:
        run_op(op, run)


def run_op(op: Op, run: Run) -> None:
    fused = FUSED.get(op.kind)
    if fused is not None and not fused.applies(op, run):
        run_ops(op.parts, run)
    elif fused is not None:
        fused.run(op, run)
    else:
        RUNNERS[op.kind](op, run)


def output(run: Run) -> Tensor:
    h, t, n = run.h, run.t, run.n
    if run.layout == "grouped":
        return h.reshape(n, t, -1, *h.shape[2:]).transpose(0, 1)
    return h.reshape(t, n, *h.shape[1:]) if run.layout == "flat" else h


# -- the basic operations ------------------------------------------------------------------------
@runner("conv")
def _conv(op: Op, run: Run) -> None:
    m, w, b = op.module, run.params[op.weight], run.param(op.bias)
    if run.layout == "flat" and not run.per_task(op.weight) and not run.per_task(op.bias):
        run.h = F.conv2d(run.h, w, b, m.stride, m.padding, m.dilation)
        return
    run.grouped()
    t = run.t
    w = w.reshape(-1, *w.shape[-3:]) if run.per_task(op.weight) else w.repeat(t, 1, 1, 1)
    if b is not None:
        b = b.reshape(-1) if run.per_task(op.bias) else b.repeat(t)
    run.h = F.conv2d(run.h, w, b, m.stride, m.padding, m.dilation, groups=t)


@runner("bn")
def _bn(op: Op, run: Run) -> None:
    m, w, b = bn_setup(op, run)
    h, t, c, layout = run.h, run.t, m.num_features, run.layout
    if layout == "grouped":
        # One channel per (task, feature): F.batch_norm's per-channel statistics are per task.
        def rep(v: Tensor | None) -> Tensor | None:
            if v is None:
                return None
            return v.reshape(-1) if v.dim() == 2 else v.repeat(t)
        if run.use_running_stats:
            run.h = F.batch_norm(h, m.running_mean.repeat(t), m.running_var.repeat(t), rep(w), rep(b),
                                 False, 0.0, m.eps)
        else:
            run.h = grouped_batch_norm(h, rep(w), rep(b), m.eps)
        return
    # flat [T*N, C, ...] or tasks [T, N, C]: view as [T, N, C, rest] and normalise per task.
    x = task_view(h, layout, t, c)
    shape = [1] * x.dim()
    shape[2] = c

    def bc(v: Tensor | None) -> Tensor | None:
        if v is None:
            return None
        return v.reshape([t] + shape[1:]) if v.dim() == 2 else v.reshape(shape)   # per task [T, C]
    if run.use_running_stats:
        y = (x - m.running_mean.reshape(shape)) * torch.rsqrt(m.running_var.reshape(shape) + m.eps)
        y = y * bc(w) if w is not None else y
        y = y + bc(b) if b is not None else y
    else:
        y = batch_norm_exact(x, (1,) + tuple(range(3, x.dim())), bc(w), bc(b), m.eps)
    run.h = y.reshape(h.shape)


@runner("relu")
def _relu(op: Op, run: Run) -> None:
    run.h = F.relu(run.h)


@runner("leaky_relu")
def _leaky_relu(op: Op, run: Run) -> None:
    run.h = F.leaky_relu(run.h, op.extra["slope"])


@runner("maxpool")
def _maxpool(op: Op, run: Run) -> None:
    m = op.module
    run.h = F.max_pool2d(run.h, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)


@runner("flatten")
def _flatten(op: Op, run: Run) -> None:
    h, t, n = run.h, run.t, run.n
    if run.layout == "grouped":
        # [N, T*C, H, W] -> [T, N, C*H*W], the same order as flattening each example.
        run.h = h.reshape(n, t, -1).transpose(0, 1)
        run.layout = "tasks"
    else:
        run.h = h.reshape(h.shape[0], -1) if run.layout == "flat" else h.reshape(t, n, -1)


@runner("mean_hw")
def _mean_hw(op: Op, run: Run) -> None:
    """The mean over height and width: ``[B, C, H, W]`` -> ``[B, C]``."""
    if run.layout == "grouped":
        run.h = run.h.mean((2, 3)).reshape(run.n, run.t, -1).transpose(0, 1)
        run.layout = "tasks"
    else:
        run.h = run.h.mean((2, 3))


@runner("linear")
def _linear(op: Op, run: Run) -> None:
    w, b = run.params[op.weight], run.param(op.bias)
    if run.layout == "flat" and not run.per_task(op.weight) and not run.per_task(op.bias):
        run.h = F.linear(run.h, w, b)
        return
    if run.layout == "flat":
        run.h = run.h.reshape(run.t, run.n, -1)
        run.layout = "tasks"
    t = run.t
    wt = (w if run.per_task(op.weight) else w.expand(t, *w.shape)).transpose(1, 2)
    if b is None:
        run.h = torch.bmm(run.h, wt)
    else:
        bt = b if run.per_task(op.bias) else b.expand(t, *b.shape)
        run.h = torch.baddbmm(bt.unsqueeze(1), run.h, wt)


@runner("add")
def _add(op: Op, run: Run) -> None:
    """The sum of the branches, each run on the current activation (a residual connection)."""
    start, layout = run.h, run.layout
    outs = []
    for branch in op.branches:
        run.h, run.layout = start, layout
        run_ops(branch, run)
        outs.append((run.h, run.layout))
    if any(lay == "grouped" for _, lay in outs):
        outs = [(h if lay == "grouped" else to_grouped(h, run.t, run.channels_last), "grouped") for h, lay in outs]
    if len({lay for _, lay in outs}) > 1:
        raise ValueError(f"add: branches end in different layouts {[lay for _, lay in outs]}")
    total = outs[0][0]
    for h, _ in outs[1:]:
        total = total + h
    run.h, run.layout = total, outs[0][1]


# -- batch norm helpers shared with the passes ---------------------------------------------------
def bn_setup(op: Op, run: Run):
    """The batch-norm module, its (possibly per-task) scale and shift; records batch statistics."""
    m = op.module
    if run.use_running_stats and m.running_mean is None:
        raise ValueError("batch norm mode 'running' needs track_running_stats=True in the backbone")
    if run.record is not None and not run.use_running_stats:
        record_stats(op, run)
    return m, run.param(op.weight), run.param(op.bias)


def record_stats(op: Op, run: Run) -> None:
    """Batch mean and unbiased variance of ``h`` per feature, averaged over tasks (no graph)."""
    with torch.no_grad():
        c, t = op.module.num_features, run.t
        x = task_view(run.h, run.layout, t, c)
        dims = (1,) + tuple(range(3, x.dim()))
        count = x.numel() // (t * c)
        run.record[op.prefix] = (x.mean(dims).mean(0), x.var(dims, correction=1).mean(0) if count > 1 else None)


def bn_relu_pool(op: Op, run: Run) -> Tensor:
    """max-pool(ReLU(gamma * xhat + beta)) computed as ReLU(gamma * max-pool(xhat) + beta).

    ``xhat`` (``x`` normalised, no affine part) is an increasing function of ``x`` per channel,
    and ``v -> ReLU(gamma v + beta)`` is increasing where ``gamma > 0``, so it commutes with
    max-pooling and can run on the pooled tensor, a quarter of the size: on CPU the
    element-wise passes over the largest activations cost more than the convolutions.
    Channels with ``gamma < 0`` pool ``-xhat`` instead (min-pooling). Same values and
    gradients as the three separate layers up to rounding, to any order.
    """
    m, w, b = bn_setup(op, run)
    pool, c = op.extra["pool"], m.num_features
    h, t, layout = run.h, run.t, run.layout
    if layout == "grouped":
        # Per-channel = per-task statistics; the native kernel is the fastest way to them.
        if run.use_running_stats:
            xhat = F.batch_norm(h, m.running_mean.repeat(t), m.running_var.repeat(t), None, None,
                                False, 0.0, m.eps)
        else:
            xhat = grouped_batch_norm(h, None, None, m.eps)

        def per_channel(v):            # [C] or per task [T, C] -> [1, T*C, 1, 1]
            return (v.reshape(-1) if v.dim() == 2 else v.repeat(t)).reshape(1, -1, 1, 1)
    else:
        x5 = task_view(h, layout, t, c)                         # [T, N, C, H, W]
        if run.use_running_stats:
            shape = (1, 1, c, 1, 1)
            xhat = (x5 - m.running_mean.reshape(shape)) * torch.rsqrt(m.running_var.reshape(shape) + m.eps)
        else:
            xhat = batch_norm_exact(x5, (1, 3, 4), None, None, m.eps)
        xhat = xhat.reshape(h.shape)

        def per_channel(v):            # [C] or per task [T, C] -> [T, 1, C, 1, 1]
            return (v if v.dim() == 2 else v.expand(t, c)).reshape(t, 1, c, 1, 1)
    gamma = per_channel(w) if w is not None else None
    beta = per_channel(b) if b is not None else None
    if gamma is not None and not bool((gamma > 0).all()):
        sign = torch.where(gamma < 0, -1.0, 1.0).to(gamma.dtype)
        gamma = gamma * sign
        xhat = (xhat if layout == "grouped" else xhat.reshape(t, -1, *xhat.shape[1:])) * sign
        xhat = xhat.reshape(h.shape)
    p = F.max_pool2d(xhat, pool.kernel_size, pool.stride)
    if layout != "grouped":
        p = p.reshape(t, -1, *p.shape[1:])
    y = p * gamma if gamma is not None else p
    y = F.relu(y + beta if beta is not None else y)
    return y if layout == "grouped" else y.reshape(-1, *y.shape[2:])


def task_view(h: Tensor, layout: str, t: int, c: int) -> Tensor:
    """Any layout -> ``[T, N, C, *spatial]`` (a copy only for the grouped layout)."""
    if layout == "grouped":
        return h.reshape(h.shape[0], t, c, *h.shape[2:]).transpose(0, 1)
    return h.reshape(t, -1, *h.shape[1:]) if layout == "flat" else h


def to_grouped(h: Tensor, t: int, channels_last: bool = False) -> Tensor:
    """``[T*N, C, H, W]`` -> grouped ``[N, T*C, H, W]`` (task-major channels)."""
    tn, c, hh, ww = h.shape
    g = h.reshape(t, tn // t, c, hh, ww).transpose(0, 1).reshape(tn // t, t * c, hh, ww)
    return g.contiguous(memory_format=torch.channels_last) if channels_last else g
