"""Optional C++ kernels, compiled on first use with the local C++ compiler.

:func:`conv_pool_relu` runs a first layer -- per-task convolution, bias, 2x2 max-pool, ReLU --
without ever writing its full-resolution feature map (see ``conv_pool.cpp``). It is
differentiable twice (MAML's second-order meta-gradient needs exactly that) with respect to the
kernel and bias; its input is data and gets no gradient.

Compiling needs a C++ compiler, the Python headers and ``ninja`` (``pip install ninja``); the
result is cached by PyTorch (``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``),
built with ``-march=native`` under a name tied to the CPU's instruction sets
(``METAMAP_KERNELS_PORTABLE=1`` builds a generic one instead).
If compiling fails the library warns once and keeps using the PyTorch layers, which compute the
same function.
"""
from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

_lock = threading.Lock()
_built: dict[str, object] = {}
_failed: dict[str, str] = {}


def build(stem: str):
    """The compiled extension of ``<stem>.cpp`` beside this file, or ``None`` if it cannot be built
    here (warns once per source)."""
    if stem in _built or stem in _failed:
        return _built.get(stem)
    with _lock:
        if stem not in _built and stem not in _failed:
            try:
                from torch.utils.cpp_extension import load as compile_extension
                flags = ["-O3", "-fopenmp"]
                name = f"metamap_{stem}"
                if os.environ.get("METAMAP_KERNELS_PORTABLE") != "1":
                    # Built for this CPU; the name carries its instruction sets, so that a cache
                    # shared between machines (a home directory on a cluster) never hands one
                    # CPU's build to another.
                    flags.append("-march=native")
                    name += "_" + _cpu_tag()
                _built[stem] = compile_extension(name, [str(Path(__file__).with_name(stem + ".cpp"))],
                                                 extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as e:  # any build failure means: use the PyTorch layers
                _failed[stem] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                warnings.warn(
                    f"metamap could not compile its C++ kernel {stem} ({_failed[stem]}); using the PyTorch "
                    f"layers instead (same results, slower). Install a C++ compiler and `pip install ninja`, "
                    f"or set learner.cpp_kernels = false to silence this.", RuntimeWarning, stacklevel=3)
    return _built.get(stem)


def load():
    """The compiled first-layer extension (``conv_pool.cpp``), or ``None`` (warns once)."""
    global _module
    _module = build("conv_pool")
    return _module


_module = None


def _cpu_tag() -> str:
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        import platform
        flags = platform.processor() or platform.machine()
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


def available() -> bool:
    return load() is not None


class _ConvPoolReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor, kh: int, kw: int, pad: int) -> Tensor:
        out, idx = _module.forward(x, w, b, kh, kw, pad)
        ctx.save_for_backward(x, w, out, idx)
        ctx.geometry = (kh, kw, pad)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w, out, idx = ctx.saved_tensors
        # A Function of its own, so that a graph built here (create_graph=True: MAML's inner
        # gradients) can be differentiated once more.
        gw, gb = _ConvPoolReLUGrad.apply(grad, x, w, out, idx, *ctx.geometry)
        return None, gw, gb, None, None, None


class _ConvPoolReLUGrad(torch.autograd.Function):
    """``grad -> (d/dw, d/db)``: linear in ``grad``; the pooling choice and ReLU mask are locally
    constant, so its own derivative is the masked convolution of ``masked_forward``."""

    @staticmethod
    def forward(ctx, grad, x, w, out, idx, kh, kw, pad):
        gw, gb = _module.backward(grad.contiguous(), x, w, out, idx, kh, kw, pad)
        ctx.save_for_backward(x, w, out, idx)
        ctx.geometry = (kh, kw, pad)
        return gw, gb

    @staticmethod
    def backward(ctx, vw, vb):
        # Grad mode is on here only when a graph for a third derivative is being built: refuse
        # rather than return a silently wrong one.
        if torch.is_grad_enabled():
            raise RuntimeError(
                "metamap's C++ first-layer kernel is differentiable twice, not three times; set "
                "learner.cpp_kernels = false for higher-order derivatives")
        x, w, out, idx = ctx.saved_tensors
        vw = torch.zeros_like(w) if vw is None else vw.contiguous()
        vb = out.new_zeros(w.shape[0], w.shape[2]) if vb is None else vb.contiguous()
        return _module.masked_forward(x, vw, vb, out, idx, *ctx.geometry), None, None, None, None, None, None, None


def conv_pool_relu(x: Tensor, weight: Tensor, bias: Tensor, padding: int) -> Tensor:
    """``relu(max_pool2d(conv2d(x_t, weight_t, bias_t, padding), 2))`` for every task ``t`` at once.

    ``x [N, T, C_in, H, W]`` (data: not differentiated), ``weight [T, C, C_in, kh, kw]``,
    ``bias [T, C]`` -> grouped channels-last ``[N, T*C, H', W']``. Needs :func:`available`.
    """
    t, c, cin, kh, kw = weight.shape
    w = weight.reshape(t, c, cin * kh * kw).transpose(1, 2).contiguous()      # [T, D, C]
    padded = F.pad(x, (padding,) * 4).contiguous()                               # no bounds checks
    out = _ConvPoolReLU.apply(padded, w, bias.contiguous(), kh, kw, padding)
    n, ho, wo = out.shape[:3]
    return out.reshape(n, ho, wo, t * c).permute(0, 3, 1, 2)


class _BNReLUPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> Tensor:
        module = build("bn_relu_pool")
        y, idx, mean, rstd = module.forward(z, gamma, beta, eps)
        ctx.save_for_backward(z, y, idx, gamma, mean, rstd)
        ctx.mark_non_differentiable(idx, mean, rstd)
        return y, mean, rstd

    @staticmethod
    def backward(ctx, gy: Tensor, _gmean, _grstd):
        if torch.is_grad_enabled():      # a graph of this backward is being built: refuse, never zero
            raise RuntimeError("metamap's C++ batch-norm/pool kernel is differentiable once, not twice; it "
                               "serves passes whose graph is differentiated once (MAML's query pass)")
        z, y, idx, gamma, mean, rstd = ctx.saved_tensors
        gz, ggamma, gbeta = build("bn_relu_pool").backward(gy.contiguous(), z, y, idx, gamma, mean, rstd)
        return gz, ggamma, gbeta, None


def bn_relu_pool(z: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``relu(max_pool2d(batch_norm(z, gamma, beta), 2))`` with batch statistics per channel, in two passes.

    ``z [N, K, H, W]`` channels-last (grouped maps: K = tasks x features), ``gamma``, ``beta [K]`` ->
    ``(y [N, K, H // 2, W // 2]`` channels-last, ``mean [K]``, ``rstd [K]`` (no gradient)``)``.
    Differentiable once (with respect to ``z``, ``gamma`` and ``beta``); needs ``build("bn_relu_pool")``.
    """
    zl = z.permute(0, 2, 3, 1)
    if not zl.is_contiguous():
        zl = zl.contiguous()
    y, mean, rstd = _BNReLUPool.apply(zl, gamma.contiguous(), beta.contiguous(), float(eps))
    return y.permute(0, 3, 1, 2), mean, rstd
