"""Run a network with *per-task* weights for a whole meta-batch of tasks at once.

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
has an extra leading ``T`` dimension. The network is described by a list of layer specs made by
:func:`compile_layers`; unknown modules make it return ``None`` and callers fall back to a
per-task loop over ``torch.func.functional_call``.

Batch norm is written out from mean / variance / rsqrt where statistics must be per task but the
layout is flat, and uses ``F.batch_norm`` in the grouped layout (one channel per task and
feature). Both give exact second-order gradients outside ``vmap`` (see the tests).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metamap.nets import kernels
from metamap.nets.backbones import MLP, Conv4

BN_MODES = ("transductive", "running")
# Batch norm folds into a per-task convolution whose patches have at most this many values
# (C_in * k * k): a D x D covariance per task is cheaper than normalising the feature maps for a
# first layer (grey 3x3: 9, RGB 3x3: 27), far dearer for 64 input channels (576).
FOLD_MAX_PATCH = 27


@dataclass
class Layer:
    """One step of a network: ``kind`` plus the module and the names of its parameters."""

    kind: str                     # conv | bn | relu | maxpool | linear | flatten
    module: nn.Module | None = None
    weight: str | None = None     # parameter names (full dotted names in the root module)
    bias: str | None = None
    prefix: str = ""              # for batch norm buffers
    extra: dict = field(default_factory=dict)


def compile_layers(module: nn.Module, prefix: str = "") -> list[Layer] | None:
    """Flatten ``module`` into :class:`Layer` specs, or ``None`` if it contains unknown modules."""
    p = f"{prefix}." if prefix else ""

    def named(name: str) -> str | None:
        return p + name if getattr(module, name, None) is not None else None

    if isinstance(module, nn.Sequential):
        out: list[Layer] = []
        for name, child in module.named_children():
            sub = compile_layers(child, p + name)
            if sub is None:
                return None
            out += sub
        return out
    if isinstance(module, Conv4):
        # Conv4.forward is features(x).flatten(1).
        body = compile_layers(module.features, p + "features")
        return None if body is None else body + [Layer("flatten")]
    if isinstance(module, MLP):
        body = compile_layers(module.net, p + "net")
        return None if body is None else [Layer("flatten")] + body
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            return None
        return [Layer("conv", module, named("weight"), named("bias"))]
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return [Layer("bn", module, named("weight"), named("bias"), prefix)]
    if isinstance(module, nn.Linear):
        return [Layer("linear", module, named("weight"), named("bias"))]
    if isinstance(module, nn.ReLU):
        return [Layer("relu")]
    if isinstance(module, nn.MaxPool2d):
        return [Layer("maxpool", module)]
    if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
        return [Layer("flatten")]
    if isinstance(module, nn.Identity):
        return []
    return None


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


class TaskBatchedNet:
    """Evaluate a compiled network on ``x [T, N, *example]`` with shared or per-task weights.

    ``bn_mode``: ``"transductive"`` normalises every task's examples with their own batch
    statistics (as the reference MAML does, at training and at test time); ``"running"`` does so
    while training and uses the module's running statistics at evaluation
    (``use_running_stats=True``). Running statistics are never updated here: the learner does
    that, outside the graph.
    """

    def __init__(self, layers: list[Layer], fuse: bool = True, fold: bool = True, cpp: bool = True):
        self.layers = fuse_bn_relu_pool(layers) if fuse else layers
        self.fold, self.cpp = fold, cpp
        # A weight with one more dimension than the module's parameter is per task.
        self.dims = {getattr(layer, a): getattr(layer.module, a).dim()
                     for layer in layers for a in ("weight", "bias") if getattr(layer, a)}

    def __call__(self, params: dict[str, Tensor], x: Tensor, num_tasks: int,
                 use_running_stats: bool = False, channels_last: bool = False,
                 record: dict[str, tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """``x [T, N, *example]`` -> ``[T, N, *output]``.

        ``record``, if given, receives each batch-norm layer's batch mean and unbiased
        variance averaged over tasks (detached), keyed by module name.
        """
        t, n = num_tasks, x.shape[1]
        h = x.reshape(t * n, *x.shape[2:])
        layout = "flat"          # flat [T*N, ...] | grouped [N, T*C, H, W] | tasks [T, N, F]

        def per_task(name: str | None) -> bool:
            return name is not None and params[name].dim() == self.dims[name] + 1

        # Set when a convolution already applied the batch norm after it ("normalised") and maybe
        # that layer's ReLU and pooling too ("pooled").
        folded: str | None = None
        for i, layer in enumerate(self.layers):
            k = layer.kind
            if folded and k in ("bn", "bn_relu_pool"):
                done, folded = folded == "pooled", None
                if k == "bn_relu_pool" and not done:
                    # ReLU is increasing, so it commutes with max-pooling: pool the quarter first.
                    pool = layer.extra["pool"]
                    h = F.relu(F.max_pool2d(h, pool.kernel_size, pool.stride))
                continue
            if k == "conv":
                m = layer.module
                w = params[layer.weight]
                b = params[layer.bias] if layer.bias else None
                nxt = self.layers[i + 1] if i + 1 < len(self.layers) else None
                # Batch norm with per-task statistics folds into the convolution before it, which
                # then has per-task kernels even when its weights are shared (ANIL's body).
                foldable = (self.fold and not use_running_stats and nxt is not None
                            and nxt.kind in ("bn", "bn_relu_pool") and isinstance(nxt.module, nn.BatchNorm2d)
                            and m.weight[0].numel() <= FOLD_MAX_PATCH)
                if layout == "flat" and not per_task(layer.weight) and not per_task(layer.bias) and not foldable:
                    h = F.conv2d(h, w, b, m.stride, m.padding, m.dilation)
                    continue
                if layout == "flat":
                    h = to_grouped(h, t, channels_last)
                    layout = "grouped"
                if foldable:
                    kernel, shift = self._fold_bn(layer, nxt, params, h, t, record)
                    if self._fused_first_layer(layer, nxt, h):
                        # The folded layer, its ReLU and pooling in one C++ pass.
                        x5 = h.reshape(h.shape[0], t, -1, *h.shape[2:])
                        h = kernels.conv_pool_relu(x5, kernel.reshape(t, -1, *kernel.shape[1:]),
                                                   shift.reshape(t, -1), m.padding[0])
                        folded = "pooled"
                    else:
                        h = F.conv2d(h, kernel, shift, m.stride, m.padding, m.dilation, groups=t)
                        folded = "normalised"
                    continue
                w = w.reshape(-1, *w.shape[-3:]) if per_task(layer.weight) else w.repeat(t, 1, 1, 1)
                if b is not None:
                    b = b.reshape(-1) if per_task(layer.bias) else b.repeat(t)
                h = F.conv2d(h, w, b, m.stride, m.padding, m.dilation, groups=t)
            elif k == "bn":
                h = self._bn(layer, params, h, layout, t, use_running_stats, record)
            elif k == "bn_relu_pool":
                h = self._bn_relu_pool(layer, params, h, layout, t, use_running_stats, record)
            elif k == "relu":
                h = F.relu(h)
            elif k == "maxpool":
                m = layer.module
                h = F.max_pool2d(h, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
            elif k == "flatten":
                if layout == "grouped":
                    # [N, T*C, H, W] -> [T, N, C*H*W], the same order as flattening each example.
                    h = h.reshape(n, t, -1).transpose(0, 1)
                    layout = "tasks"
                else:
                    h = h.reshape(h.shape[0], -1) if layout == "flat" else h.reshape(t, n, -1)
            elif k == "linear":
                w = params[layer.weight]
                b = params[layer.bias] if layer.bias else None
                if layout == "flat" and not per_task(layer.weight) and not per_task(layer.bias):
                    h = F.linear(h, w, b)
                    continue
                if layout == "flat":
                    h = h.reshape(t, n, -1)
                    layout = "tasks"
                wt = (w if per_task(layer.weight) else w.expand(t, *w.shape)).transpose(1, 2)
                if b is None:
                    h = torch.bmm(h, wt)
                else:
                    bt = b if per_task(layer.bias) else b.expand(t, *b.shape)
                    h = torch.baddbmm(bt.unsqueeze(1), h, wt)
            else:  # pragma: no cover - compile_layers only makes the kinds above
                raise AssertionError(k)
        if layout == "grouped":
            return h.reshape(n, t, -1, *h.shape[2:]).transpose(0, 1)
        return h.reshape(t, n, *h.shape[1:]) if layout == "flat" else h

    @staticmethod
    def _fold_bn(conv: Layer, bn: Layer, params: dict[str, Tensor], h: Tensor, t: int,
                 record: dict | None) -> tuple[Tensor, Tensor]:
        """Per-task convolution + batch norm with batch statistics, as one convolution: returns
        its kernel ``[T*C, C_in, k, k]`` and bias ``[T*C]`` for the grouped input ``h``.

        Each output channel is ``z = w . p + b`` over the input patches ``p``, so its batch mean
        and biased variance are ``w . mu + b`` and ``w^T Sigma w`` from the patches' mean ``mu``
        and covariance ``Sigma`` -- a ``D x D`` matrix per task (``D = C_in * k * k``, 9 for a
        grey-scale 3x3 layer). Batch norm then folds into the kernel and bias:
        ``gamma * (z - mean) / sqrt(var + eps) + beta = conv(x, w * s) + beta - s * (w . mu)``
        with ``s = gamma / sqrt(var + eps)``. The same function, differentiable to any order, but
        the normalisation and its derivatives no longer pass over the largest feature maps.
        """
        m, norm = conv.module, bn.module
        w = params[conv.weight]
        w = w if w.dim() == 5 else w.expand(t, *w.shape)               # [T, C, C_in, k, k]
        n, c, d = h.shape[0], w.shape[1], w[0, 0].numel()
        patches = F.unfold(h, m.kernel_size, m.dilation, m.padding, m.stride)   # [N, T*D, L]
        patches = patches.reshape(n, t, d, -1).permute(1, 2, 0, 3).reshape(t, d, -1)  # [T, D, N*L]
        mu = patches.mean(2, keepdim=True)                            # [T, D, 1]
        centred = patches - mu
        sigma = centred @ centred.transpose(1, 2) / centred.shape[2]  # [T, D, D], biased
        wf = w.reshape(t, c, d)
        w_mu = (wf @ mu).squeeze(2)                                   # [T, C]
        var = ((wf @ sigma) * wf).sum(2)                              # [T, C]: w^T Sigma w
        scale = torch.rsqrt(var + norm.eps)
        gamma = params[bn.weight] if bn.weight else None
        beta = params[bn.bias] if bn.bias else None
        if gamma is not None:
            scale = scale * gamma                                     # [T, C] (gamma [C] or [T, C])
        shift = -scale * w_mu
        if beta is not None:
            shift = shift + beta
        if record is not None:
            with torch.no_grad():
                b = params[conv.bias] if conv.bias else None
                mean = w_mu + (b if b is not None else 0)
                count = centred.shape[2]
                record[bn.prefix] = (mean.mean(0), (var * count / (count - 1)).mean(0) if count > 1 else None)
        kernel = (w * scale.reshape(t, c, 1, 1, 1)).reshape(t * c, *w.shape[2:])
        return kernel, shift.reshape(-1)

    def _fused_first_layer(self, conv: Layer, bn: Layer, h: Tensor) -> bool:
        """Whether the C++ conv-pool-ReLU kernel can run this folded layer: stride-1 convolution
        over data (no gradient wanted for ``h``) followed by ReLU and 2x2 pooling."""
        m = conv.module
        pool = bn.extra.get("pool")
        return (self.cpp and bn.kind == "bn_relu_pool" and pool is not None and _pair(pool.kernel_size) == (2, 2)
                and _pair(m.stride) == (1, 1) and _pair(m.dilation) == (1, 1)
                and m.padding[0] == m.padding[1] and h.device.type == "cpu"
                and h.dtype in (torch.float32, torch.float64) and not h.requires_grad
                and kernels.available())

    def _bn_setup(self, layer: Layer, params: dict[str, Tensor], h: Tensor, layout: str, t: int,
                  use_running_stats: bool, record: dict | None):
        """The batch-norm module, its (possibly per-task) scale and shift; records batch statistics."""
        m = layer.module
        if use_running_stats and m.running_mean is None:
            raise ValueError("batch norm mode 'running' needs track_running_stats=True in the backbone")
        if record is not None and not use_running_stats:
            self._record(layer, h, layout, t, record)
        return (m, params[layer.weight] if layer.weight else None, params[layer.bias] if layer.bias else None)

    def _bn(self, layer: Layer, params: dict[str, Tensor], h: Tensor, layout: str, t: int,
            use_running_stats: bool, record: dict | None) -> Tensor:
        m, w, b = self._bn_setup(layer, params, h, layout, t, use_running_stats, record)
        c = m.num_features
        if layout == "grouped":
            # One channel per (task, feature): F.batch_norm's per-channel statistics are per task.
            def rep(v: Tensor | None) -> Tensor | None:
                if v is None:
                    return None
                return v.reshape(-1) if v.dim() == 2 else v.repeat(t)
            if use_running_stats:
                return F.batch_norm(h, m.running_mean.repeat(t), m.running_var.repeat(t), rep(w), rep(b),
                                    False, 0.0, m.eps)
            return F.batch_norm(h, None, None, rep(w), rep(b), True, 0.0, m.eps)
        # flat [T*N, C, ...] or tasks [T, N, C]: view as [T, N, C, rest] and normalise per task.
        x = task_view(h, layout, t, c)
        shape = [1] * x.dim()
        shape[2] = c

        def bc(v: Tensor | None) -> Tensor | None:
            if v is None:
                return None
            return v.reshape([t] + shape[1:]) if v.dim() == 2 else v.reshape(shape)   # per task [T, C]
        if use_running_stats:
            y = (x - m.running_mean.reshape(shape)) * torch.rsqrt(m.running_var.reshape(shape) + m.eps)
            y = y * bc(w) if w is not None else y
            y = y + bc(b) if b is not None else y
        else:
            y = batch_norm_exact(x, (1,) + tuple(range(3, x.dim())), bc(w), bc(b), m.eps)
        return y.reshape(h.shape)

    def _bn_relu_pool(self, layer: Layer, params: dict[str, Tensor], h: Tensor, layout: str, t: int,
                      use_running_stats: bool, record: dict | None) -> Tensor:
        """max-pool(ReLU(gamma * xhat + beta)) computed as ReLU(gamma * max-pool(xhat) + beta).

        ``xhat`` (``x`` normalised, no affine part) is an increasing function of ``x`` per channel,
        and ``v -> ReLU(gamma v + beta)`` is increasing where ``gamma > 0``, so it commutes with
        max-pooling and can run on the pooled tensor, a quarter of the size: on CPU the
        element-wise passes over the largest activations cost more than the convolutions.
        Channels with ``gamma < 0`` pool ``-xhat`` instead (min-pooling). Same values and
        gradients as the three separate layers up to rounding, to any order.
        """
        m, w, b = self._bn_setup(layer, params, h, layout, t, use_running_stats, record)
        pool, c = layer.extra["pool"], m.num_features
        if layout == "grouped":
            # Per-channel = per-task statistics; the native kernel is the fastest way to them.
            if use_running_stats:
                xhat = F.batch_norm(h, m.running_mean.repeat(t), m.running_var.repeat(t), None, None,
                                    False, 0.0, m.eps)
            else:
                xhat = F.batch_norm(h, None, None, None, None, True, 0.0, m.eps)

            def per_channel(v):            # [C] or per task [T, C] -> [1, T*C, 1, 1]
                return (v.reshape(-1) if v.dim() == 2 else v.repeat(t)).reshape(1, -1, 1, 1)
        else:
            x5 = task_view(h, layout, t, c)                         # [T, N, C, H, W]
            if use_running_stats:
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

    @staticmethod
    def _record(layer: Layer, h: Tensor, layout: str, t: int, record: dict) -> None:
        """Batch mean and unbiased variance of ``h`` per feature, averaged over tasks (no graph)."""
        with torch.no_grad():
            c = layer.module.num_features
            x = task_view(h, layout, t, c)
            dims = (1,) + tuple(range(3, x.dim()))
            count = x.numel() // (t * c)
            record[layer.prefix] = (x.mean(dims).mean(0),
                                    x.var(dims, correction=1).mean(0) if count > 1 else None)


def fuse_bn_relu_pool(layers: list[Layer]) -> list[Layer]:
    """Merge each [batch norm, ReLU, 2x2 max-pool] run into one ``bn_relu_pool`` layer."""
    out, i = [], 0
    while i < len(layers):
        a = layers[i]
        if (a.kind == "bn" and i + 2 < len(layers) and layers[i + 1].kind == "relu"
                and layers[i + 2].kind == "maxpool" and _plain_pool(layers[i + 2].module)
                and isinstance(a.module, nn.BatchNorm2d)):
            out.append(Layer("bn_relu_pool", a.module, a.weight, a.bias, a.prefix,
                             {"pool": layers[i + 2].module}))
            i += 3
        else:
            out.append(a)
            i += 1
    return out


def _pair(v) -> tuple:
    return (v, v) if isinstance(v, int) else tuple(v)


def _plain_pool(m: nn.MaxPool2d) -> bool:
    stride = m.stride if m.stride is not None else m.kernel_size
    return (_pair(m.padding) == (0, 0) and _pair(m.dilation) == (1, 1) and not m.ceil_mode
            and _pair(stride) == _pair(m.kernel_size) and not m.return_indices)


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
