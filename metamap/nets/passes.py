"""Rewrite passes of the fast backend: each replaces a run of operations by one fused operation.

A pass is a small :class:`RewritePass`: ``match`` says how many operations starting at a
position it fuses, ``fuse`` builds the fused :class:`~metamap.nets.program.Op` (whose ``parts``
are the operations it replaces), ``applies`` decides at run time whether the fused form fits
the current input (else the executor runs the parts: the same function), and ``run`` computes
it. Each pass has a ``lever``, the ``learner.*`` switch that turns it on. Adding a fused kernel
is one new pass, registered with :func:`register_pass`; passes rewrite in registration order,
so a pass may fuse what an earlier one made.

=====================  ================================================  ================
pass                   fuses                                             lever
=====================  ================================================  ================
``FuseBnReluPool``     batch norm, ReLU, 2x2 max-pool -> one pass over     ``fuse_bn_pool``
                       the pooled quarter of the activations
``FoldBatchNorm``      convolution + batch norm with batch statistics     ``fold_bn``
                       -> one convolution (patch moments)
``CppFirstLayer``      the folded layer + ReLU + 2x2 pool on data ->      ``cpp_kernels``
                       the C++ kernel (:mod:`metamap.nets.kernels`)
``CppBnReluPool``      a later ``bn_relu_pool`` on grouped maps -> the     ``cpp_kernels``
                       C++ kernel: two passes each way, statistics in
                       double precision
=====================  ================================================  ================
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metamap.nets import kernels
from metamap.nets.functional import FUSED, Run, bn_relu_pool, bn_setup
from metamap.nets.program import Op

# Batch norm folds into a convolution whose patches have at most this many values
# (C_in * k * k): a D x D covariance per task is cheaper than normalising the feature maps for a
# first layer (grey 3x3: 9, RGB 3x3: 27), far dearer for 64 input channels (576).
FOLD_MAX_PATCH = 27


class RewritePass:
    """Base class; see the module docstring."""

    kind: ClassVar[str] = ""          # the fused operation it makes
    lever: ClassVar[str] = ""         # the learner option that enables it

    def match(self, ops: list[Op], i: int) -> int:
        """How many operations from ``ops[i]`` on this pass fuses (0: none)."""
        raise NotImplementedError

    def fuse(self, ops: list[Op]) -> Op:
        raise NotImplementedError

    def applies(self, op: Op, run: Run) -> bool:
        """Whether the fused form fits this input; else its parts run."""
        return True

    def run(self, op: Op, run: Run) -> None:
        raise NotImplementedError

    def prepare(self) -> bool:
        """Called once when a backend uses this pass (outside any forward pass), e.g. to build a
        kernel; ``False`` drops the pass (its parts then always run)."""
        return True

    def rewrite(self, ops: list[Op]) -> list[Op]:
        out, i = [], 0
        while i < len(ops):
            k = self.match(ops, i)
            if k:
                out.append(self.fuse(ops[i:i + k]))
                i += k
                continue
            op = ops[i]
            if op.branches:     # rewrite inside residual branches too
                op = Op(op.kind, op.module, op.weight, op.bias, op.prefix, op.extra, op.parts,
                        tuple(self.rewrite(b) for b in op.branches))
            out.append(op)
            i += 1
        return out


PASSES: list[RewritePass] = []


def register_pass(cls: type[RewritePass]) -> type[RewritePass]:
    instance = cls()
    PASSES.append(instance)
    FUSED[cls.kind] = instance
    return cls


def rewrite(program: list[Op], levers: dict[str, bool]) -> list[Op]:
    """``program`` after every registered pass whose lever is on (and whose ``prepare`` succeeds)."""
    for p in PASSES:
        if levers.get(p.lever, False) and _matches(p, program) and p.prepare():
            program = p.rewrite(program)
    return program


def _matches(p: RewritePass, ops: list[Op]) -> bool:
    return any(p.match(ops, i) for i in range(len(ops))) or any(
        _matches(p, branch) for op in ops for branch in op.branches)


def kinds(program: list[Op]) -> list[str]:
    """Every operation kind in ``program``, branches included (for tests and reports)."""
    out = []
    for op in program:
        out.append(op.kind)
        for branch in op.branches:
            out += kinds(branch)
    return out


def pair(v) -> tuple:
    return (v, v) if isinstance(v, int) else tuple(v)


def plain_pool(m: nn.MaxPool2d) -> bool:
    stride = m.stride if m.stride is not None else m.kernel_size
    return (pair(m.padding) == (0, 0) and pair(m.dilation) == (1, 1) and not m.ceil_mode
            and pair(stride) == pair(m.kernel_size) and not m.return_indices)


@register_pass
class FuseBnReluPool(RewritePass):
    """[BatchNorm2d, ReLU, max-pool (no padding, stride = kernel)] -> ``bn_relu_pool``."""

    kind, lever = "bn_relu_pool", "fuse_bn_pool"

    def match(self, ops: list[Op], i: int) -> int:
        a = ops[i]
        ok = (a.kind == "bn" and isinstance(a.module, nn.BatchNorm2d) and i + 2 < len(ops)
              and ops[i + 1].kind == "relu" and ops[i + 2].kind == "maxpool" and plain_pool(ops[i + 2].module))
        return 3 if ok else 0

    def fuse(self, ops: list[Op]) -> Op:
        bn = ops[0]
        return Op(self.kind, bn.module, bn.weight, bn.bias, bn.prefix, {"pool": ops[2].module}, parts=list(ops))

    def run(self, op: Op, run: Run) -> None:
        run.h = bn_relu_pool(op, run)


@register_pass
class FoldBatchNorm(RewritePass):
    """[convolution, batch norm (or ``bn_relu_pool``)] -> ``conv_bn``: with batch statistics the
    normalisation folds into the convolution's kernel and bias (see :func:`fold_bn`)."""

    kind, lever = "conv_bn", "fold_bn"

    def match(self, ops: list[Op], i: int) -> int:
        a = ops[i]
        ok = (a.kind == "conv" and i + 1 < len(ops) and ops[i + 1].kind in ("bn", "bn_relu_pool")
              and isinstance(ops[i + 1].module, nn.BatchNorm2d) and a.module.weight[0].numel() <= FOLD_MAX_PATCH)
        return 2 if ok else 0

    def fuse(self, ops: list[Op]) -> Op:
        conv, bn = ops
        return Op(self.kind, conv.module, conv.weight, conv.bias, conv.prefix,
                  {"bn": bn, "pool": bn.extra.get("pool")}, parts=list(ops))

    def applies(self, op: Op, run: Run) -> bool:
        return not run.use_running_stats          # running statistics are not the batch's

    def run(self, op: Op, run: Run) -> None:
        m, pool = op.module, op.extra["pool"]
        run.grouped()        # the kernels become per task even when the weights are shared
        kernel, shift = fold_bn(op, op.extra["bn"], run)
        run.h = F.conv2d(run.h, kernel, shift, m.stride, m.padding, m.dilation, groups=run.t)
        if pool is not None:
            # ReLU is increasing, so it commutes with max-pooling: pool the quarter first.
            run.h = F.relu(F.max_pool2d(run.h, pool.kernel_size, pool.stride))


@register_pass
class CppFirstLayer(RewritePass):
    """A folded stride-1 convolution + ReLU + 2x2 max-pool whose input is data (no gradient
    wanted for it, as for a first layer) -> the C++ kernel ``conv_pool_relu``.

    On float32 data the folded kernel and bias stay in double precision and the kernel's forward
    pass sums in double (its "wide" pass), rounding once to a float32 output: the layer's pooling
    winners and ReLU signs are then the double computation's. Float32 rounding flipped some of them
    -- the first layer has the largest maps and the most near-ties -- and a flipped winner changes a
    task's whole adaptation. Over 31 meta-batches at one inner step, this pass alone took the
    median meta-gradient error against float64 from 8.9e-5 to 4.8e-5 (the plain per-task loop:
    3.2e-5); with the centred batch-norm kernel as well the default measured 6.9e-5, a difference
    31 batches do not resolve (BENCHMARKS.md, "The first layer's decisions in double precision").
    Its backward passes stay in float32 (they decide nothing)."""

    kind, lever = "conv_bn_relu_pool_cpp", "cpp_kernels"
    wide: ClassVar[bool] = True       # the wide pass on float32 data (benchmarks turn it off to measure it)

    def match(self, ops: list[Op], i: int) -> int:
        a = ops[i]
        if a.kind != "conv_bn" or a.extra["pool"] is None:
            return 0
        m, pool = a.module, a.extra["pool"]
        ok = (pair(pool.kernel_size) == (2, 2) and pair(m.stride) == (1, 1) and pair(m.dilation) == (1, 1)
              and m.padding[0] == m.padding[1])
        return 1 if ok else 0

    def fuse(self, ops: list[Op]) -> Op:
        (folded,) = ops
        return Op(self.kind, folded.module, folded.weight, folded.bias, folded.prefix, folded.extra, parts=[folded])

    def prepare(self) -> bool:
        return kernels.build() is not None

    def applies(self, op: Op, run: Run) -> bool:
        h = run.h
        return (not run.use_running_stats and h.device.type == "cpu" and h.dtype in (torch.float32, torch.float64)
                and not h.requires_grad and kernels.loaded())

    def run(self, op: Op, run: Run) -> None:
        run.grouped()
        kernel, shift = fold_bn(op, op.extra["bn"], run, wide=self.wide and run.h.dtype == torch.float32)
        h, t, m = run.h, run.t, op.module
        x5 = h.reshape(h.shape[0], t, -1, *h.shape[2:])
        run.h = kernels.conv_pool_relu(x5, kernel.reshape(t, -1, *kernel.shape[1:]), shift.reshape(t, -1),
                                       m.padding[0])


@register_pass
class CppBnReluPool(RewritePass):
    """``bn_relu_pool`` with batch statistics on grouped maps (one channel per task and feature)
    -> the C++ kernel ``bn_relu_pool``: the forward pass reads the convolution's output twice and
    writes only the pooled quarter; the backward pass (in C++ where it is differentiated once,
    MAML's query pass) writes the full-size gradient once. PyTorch's channels-last batch norm
    also loses precision in its statistics (relative error 1e-5 on 14x14x512 maps against 2e-7
    in NCHW); the kernel accumulates them in double precision."""

    kind, lever = "bn_relu_pool_cpp", "cpp_kernels"

    def match(self, ops: list[Op], i: int) -> int:
        a = ops[i]
        return 1 if a.kind == "bn_relu_pool" and pair(a.extra["pool"].kernel_size) == (2, 2) else 0

    def fuse(self, ops: list[Op]) -> Op:
        (op,) = ops
        return Op(self.kind, op.module, op.weight, op.bias, op.prefix, op.extra, parts=[op])

    def prepare(self) -> bool:
        return kernels.bn_relu_pool_available()

    def applies(self, op: Op, run: Run) -> bool:
        h = run.h
        return (run.layout == "grouped" and not run.use_running_stats and h.device.type == "cpu"
                and h.dtype in (torch.float32, torch.float64) and kernels.bn_relu_pool_loaded())

    def run(self, op: Op, run: Run) -> None:
        m, w, b = bn_setup(op, run)
        t, k = run.t, run.h.shape[1]

        def per_channel(v: Tensor | None, fill: float) -> Tensor:   # [C] or per task [T, C] -> [T*C]
            if v is None:
                return run.h.new_full((k,), fill)
            return v.reshape(-1) if v.dim() == 2 else v.repeat(t)
        run.h = kernels.bn_relu_pool(run.h, per_channel(w, 1.0), per_channel(b, 0.0), m.eps)[0]


def fold_bn(conv: Op, bn: Op, run: Run, wide: bool = False) -> tuple[Tensor, Tensor]:
    """Per-task convolution + batch norm with batch statistics, as one convolution: returns
    its kernel ``[T*C, C_in, k, k]`` and bias ``[T*C]`` for the grouped input ``run.h``, in the
    weights' dtype, or in double precision if ``wide`` (for the C++ kernel's wide pass).

    Each output channel is ``z = w . p + b`` over the input patches ``p``, so its batch mean
    and biased variance are ``w . mu + b`` and ``w^T Sigma w`` from the patches' mean ``mu``
    and covariance ``Sigma`` -- a ``D x D`` matrix per task (``D = C_in * k * k``, 9 for a
    grey-scale 3x3 layer). Batch norm then folds into the kernel and bias:
    ``gamma * (z - mean) / sqrt(var + eps) + beta = conv(x, w * s) + beta - s * (w . mu)``
    with ``s = gamma / sqrt(var + eps)``. The same function, differentiable to any order, but
    the normalisation and its derivatives no longer pass over the largest feature maps. The
    convolution's own bias, which batch norm cancels, drops out.
    """
    m, norm, params, h, t = conv.module, bn.module, run.params, run.h, run.t
    w = params[conv.weight]
    w = w if w.dim() == 5 else w.expand(t, *w.shape)               # [T, C, C_in, k, k]
    n, c, d = h.shape[0], w.shape[1], w[0, 0].numel()
    patches = F.unfold(h, m.kernel_size, m.dilation, m.padding, m.stride)   # [N, T*D, L]
    patches = patches.reshape(n, t, d, -1).permute(1, 2, 0, 3).reshape(t, d, -1)  # [T, D, N*L]
    # The moments in double precision: in float32 their rounding (sums over N*L patches) dominated
    # the meta-gradient's error against float64 (4.8e-5 vs 2.7e-5 without folding, 1 inner step).
    double = torch.promote_types(patches.dtype, torch.float64)
    p64 = patches.to(double)
    mu = p64.mean(2, keepdim=True)                                # [T, D, 1]
    centred = p64 - mu
    sigma = centred @ centred.transpose(1, 2) / centred.shape[2]  # [T, D, D], biased
    wf = w.reshape(t, c, d).to(double)
    out = double if wide else w.dtype
    w_mu = (wf @ mu).squeeze(2).to(out)                           # [T, C]
    var = ((wf @ sigma) * wf).sum(2).to(out)                      # [T, C]: w^T Sigma w
    scale = torch.rsqrt(var + norm.eps)
    gamma, beta = run.param(bn.weight), run.param(bn.bias)
    if gamma is not None:
        scale = scale * gamma                                     # [T, C] (gamma [C] or [T, C])
    shift = -scale * w_mu
    if beta is not None:
        shift = shift + beta
    if run.record is not None:
        with torch.no_grad():
            b = run.param(conv.bias)
            mean = (w_mu + (b if b is not None else 0)).to(w.dtype)
            count = centred.shape[2]
            unbiased = (var * count / (count - 1)).to(w.dtype) if count > 1 else None
            run.record[bn.prefix] = (mean.mean(0), unbiased.mean(0) if unbiased is not None else None)
    kernel = (w.to(out) * scale.reshape(t, c, 1, 1, 1)).reshape(t * c, *w.shape[2:])
    return kernel, shift.reshape(-1)
