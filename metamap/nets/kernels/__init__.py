"""Optional C++ kernels, built explicitly with the local C++ compiler.

:func:`conv_pool_relu` runs a first layer -- per-task convolution, bias, 2x2 max-pool, ReLU --
without ever writing its full-resolution feature map (see ``conv_pool.cpp``). It is
differentiable twice (MAML's second-order meta-gradient needs exactly that) with respect to the
kernel and bias; its input is data and gets no gradient.

:func:`bn_relu_pool` runs a later block's batch norm (batch statistics), ReLU and 2x2 max-pool on
grouped channels-last maps in two passes each way (see ``bn_relu_pool.cpp``), with statistics
accumulated in double precision; its backward pass runs in C++ when no graph of it is built
(MAML's query pass) and in PyTorch operations otherwise (its inner steps).

:func:`build` compiles and loads the kernels. The fast backend calls it when it is created for a
network that can use the kernel -- never inside a forward pass -- and ``metamap build-kernels``
calls it ahead of time. Compiling needs a C++ compiler, the Python headers and ``ninja``
(``pip install ninja``); the result is cached by PyTorch (``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), built with ``-march=native`` under a name tied to the CPU's
instruction sets (``METAMAP_KERNELS_PORTABLE=1`` builds a generic one instead). Processes that
build at the same time (the ranks of a distributed run on a fresh cache) take turns under a
file lock, so one compiles and the others load its result. If compiling fails the library
warns once and keeps using the PyTorch layers, which compute the same function.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

SOURCES = ("conv_pool", "bn_relu_pool")
_SOURCE = Path(__file__).with_name("conv_pool.cpp")       # the first-layer kernel's source
_lock = threading.Lock()
_modules: dict[str, object] = {}
_failures: dict[str, str] = {}
_module = None             # conv_pool, once built


def extension_name(stem: str = "conv_pool") -> tuple[str, list[str]]:
    """The cached extension's name and its compiler flags."""
    flags = ["-O3", "-fopenmp"]
    # The source's digest is in the name: checkouts holding different versions of a kernel each keep
    # their own cached build instead of rebuilding the shared one in turn.
    name = f"metamap_{stem}_{hashlib.sha256(_source(stem).read_bytes()).hexdigest()[:8]}"
    if os.environ.get("METAMAP_KERNELS_PORTABLE") != "1":
        # Built for this CPU; the name carries its instruction sets, so that a cache shared
        # between machines (a home directory on a cluster) never hands one CPU's build to another.
        flags.append("-march=native")
        name += "_" + _cpu_tag()
    return name, flags


def build_source(stem: str, verbose: bool = False):
    """Compile (or load from the cache) ``<stem>.cpp``; ``None`` if it cannot be built here (warns once)."""
    global _module
    if stem in _modules or stem in _failures:
        return _modules.get(stem)
    with _lock:
        if stem not in _modules and stem not in _failures:
            try:
                from torch.utils.cpp_extension import load as compile_and_load
                name, flags = extension_name(stem)
                build_dir = _build_dir(name, verbose)
                with _file_lock(build_dir.parent / f"{name}.metamap-lock"):
                    _clear_stale_baton(build_dir)
                    source = _stable_source(build_dir.parent, name, _source(stem))
                    _modules[stem] = compile_and_load(name, [str(source)], extra_cflags=flags,
                                                      extra_ldflags=["-fopenmp"],
                                                      build_directory=str(build_dir), verbose=verbose)
            except Exception as e:  # any build failure means: use the PyTorch layers
                first = not _failures
                _failures[stem] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                if first:                      # one warning, however many kernels could not be built
                    warnings.warn(
                        f"metamap could not compile its C++ kernel ({_failures[stem]}); using the PyTorch "
                        f"layers instead (same results, slower). Install a C++ compiler and `pip install ninja`, "
                        f"or set learner.cpp_kernels = false to silence this.", RuntimeWarning, stacklevel=3)
    if stem == "conv_pool":
        _module = _modules.get(stem)
    return _modules.get(stem)


def build(verbose: bool = False):
    """Compile (or load) every kernel; returns the first-layer one (``None`` if it cannot be built)."""
    global _module
    for stem in SOURCES:
        build_source(stem, verbose)
    _module = _modules.get("conv_pool")
    return _module


def failure() -> str | None:
    """Why the last :func:`build` failed (``None`` if it did not)."""
    return "; ".join(f"{k}: {v}" for k, v in _failures.items()) or None


def _build_dir(name: str, verbose: bool) -> Path:
    """PyTorch's build folder for ``name`` (in the temporary folder if PyTorch cannot say)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory
        path = Path(_get_build_directory(name, verbose))
    except (ImportError, OSError, TypeError):
        import tempfile
        path = Path(tempfile.gettempdir()) / "metamap_torch_extensions" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _clear_stale_baton(build_dir: Path) -> None:
    # PyTorch marks a build in progress with a `lock` file and waits, forever, while it exists. A
    # build that was killed (a timeout, Ctrl-C) leaves it behind. Callers hold metamap's exclusive
    # lock for this extension, so no other build of it is running: any such file is stale.
    with contextlib.suppress(FileNotFoundError):
        (build_dir / "lock").unlink()


def _source(stem: str) -> Path:
    return Path(__file__).with_name(stem + ".cpp")


def _stable_source(folder: Path, name: str, source: Path = _SOURCE) -> Path:
    """A copy of the kernel's source at a path that does not depend on where metamap is installed.

    The build rules name the source file, so two installs (two checkouts, a venv and a clone)
    compiling from their own paths would each rebuild the shared cached extension in turn."""
    src = folder / f"{name}.src" / source.name
    text = source.read_bytes()
    if not src.is_file() or src.read_bytes() != text:
        src.parent.mkdir(parents=True, exist_ok=True)
        tmp = src.with_name(f".{src.name}.{os.getpid()}")
        tmp.write_bytes(text)
        os.replace(tmp, src)
    return src


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock held by one process at a time (released if the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cpu_tag() -> str:
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        import platform
        flags = platform.processor() or platform.machine()
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


def loaded() -> bool:
    """Whether the first-layer kernel is built and loaded in this process (never builds)."""
    return _module is not None


def available() -> bool:
    """Whether the first-layer kernel can be used here, building the kernels first if need be."""
    return build() is not None


def bn_relu_pool_available() -> bool:
    """Whether :func:`bn_relu_pool` can be used here (builds it if need be)."""
    return build_source("bn_relu_pool") is not None


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
        gw, gb = _module.backward(grad.contiguous(), x, w, out, idx, kh, kw, pad)   # in x's dtype
        ctx.save_for_backward(x, w, out, idx)
        ctx.geometry = (kh, kw, pad)
        return gw.to(w.dtype), gb.to(w.dtype)

    @staticmethod
    def backward(ctx, vw, vb):
        # Grad mode is on here only when a graph for a third derivative is being built: refuse
        # rather than return a silently wrong one.
        if torch.is_grad_enabled():
            raise RuntimeError(
                "metamap's C++ first-layer kernel is differentiable twice, not three times; set "
                "learner.cpp_kernels = false for higher-order derivatives")
        x, w, out, idx = ctx.saved_tensors
        vw = torch.zeros_like(w, dtype=x.dtype) if vw is None else vw.to(x.dtype).contiguous()
        vb = out.new_zeros(w.shape[0], w.shape[2]) if vb is None else vb.to(x.dtype).contiguous()
        return _module.masked_forward(x, vw, vb, out, idx, *ctx.geometry), None, None, None, None, None, None, None


def conv_pool_relu(x: Tensor, weight: Tensor, bias: Tensor, padding: int) -> Tensor:
    """``relu(max_pool2d(conv2d(x_t, weight_t, bias_t, padding), 2))`` for every task ``t`` at once.

    ``x [N, T, C_in, H, W]`` (data: not differentiated), ``weight [T, C, C_in, kh, kw]``,
    ``bias [T, C]`` -> grouped channels-last ``[N, T*C, H', W']``. Needs :func:`build` first.
    A float32 ``x`` with a float64 ``weight`` and ``bias`` runs the wide forward pass: sums in double,
    one rounding to the float32 output (the pooling winners and ReLU signs of the double
    computation); the gradients are computed in float32 and returned in the weights' dtype.
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
        y, idx, mean, rstd = _modules["bn_relu_pool"].forward(z, gamma, beta, eps)
        ctx.save_for_backward(z, y, idx, gamma, mean, rstd)
        ctx.mark_non_differentiable(idx, mean, rstd)
        ctx.eps = eps
        return y, mean, rstd

    @staticmethod
    def backward(ctx, gy: Tensor, _gmean, _grstd):
        z, y, idx, gamma, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            # A graph of this backward is being built (MAML's inner gradients): the same formulas in
            # differentiable PyTorch operations, so that second and higher derivatives are exact.
            gz, ggamma, gbeta = bn_relu_pool_backward(gy, z, y, idx, gamma, ctx.eps)
        else:
            gz, ggamma, gbeta = _modules["bn_relu_pool"].backward(gy.contiguous(), z, y, idx, gamma, mean, rstd)
        return gz, ggamma, gbeta, None


def bn_relu_pool_backward(gy: Tensor, z: Tensor, y: Tensor, idx: Tensor, gamma: Tensor, eps: float
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """The C++ backward pass of :func:`bn_relu_pool` in differentiable operations (channels-last
    ``z [N, H, W, K]``, ``gy``, ``y``, ``idx [N, H // 2, W // 2, K]``): ``(dz, dgamma, dbeta)``.

    With ``gu = gy * (y > 0)`` and ``xhat`` the normalised input, ``dbeta = sum gu``,
    ``dgamma = sum gu * xhat(winner)`` and ``dz = gamma * rstd * (S - dbeta / n - xhat * dgamma / n)``,
    ``S`` being ``gu`` scattered to the winning positions (the pooling choice and the ReLU mask are
    locally constant).
    """
    n, h, w, k = z.shape
    ho, wo = h // 2, w // 2
    mean = z.mean((0, 1, 2))
    centred = z - mean
    rstd = torch.rsqrt((centred * centred).mean((0, 1, 2)) + eps)
    xhat = centred * rstd
    onehot = F.one_hot(idx.long(), 4).to(z.dtype).permute(0, 1, 2, 4, 3)            # [N, Ho, Wo, 4, K]

    def windows(t: Tensor) -> Tensor:            # [N, 2Ho, 2Wo, K] -> [N, Ho, Wo, 4, K], q = 2 dy + dx
        return t.reshape(n, ho, 2, wo, 2, k).permute(0, 1, 3, 2, 4, 5).reshape(n, ho, wo, 4, k)

    winner = (windows(xhat[:, :2 * ho, :2 * wo]) * onehot).sum(3)
    gu = gy * (y > 0).to(gy.dtype)
    gbeta, ggamma = gu.sum((0, 1, 2)), (gu * winner).sum((0, 1, 2))
    scattered = (onehot * gu.unsqueeze(3)).reshape(n, ho, wo, 2, 2, k).permute(0, 1, 3, 2, 4, 5)
    scattered = F.pad(scattered.reshape(n, 2 * ho, 2 * wo, k), (0, 0, 0, w - 2 * wo, 0, h - 2 * ho))
    count = n * h * w
    gz = gamma * rstd * (scattered - gbeta / count - xhat * (ggamma / count))
    return gz, ggamma, gbeta


def bn_relu_pool(z: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``relu(max_pool2d(batch_norm(z, gamma, beta), 2))`` with batch statistics per channel, in two passes.

    ``z [N, K, H, W]`` channels-last (grouped maps: K = tasks x features), ``gamma``, ``beta [K]`` ->
    ``(y [N, K, H // 2, W // 2]`` channels-last, ``mean [K]``, ``rstd [K]`` (no gradient)``)``. The
    statistics are accumulated in double precision. Differentiable to any order with respect to
    ``z``, ``gamma`` and ``beta``: a backward pass without a graph (MAML's query pass) runs in C++,
    one that builds a graph (its inner steps) in PyTorch operations. Needs :func:`bn_relu_pool_available`.
    """
    zl = z.permute(0, 2, 3, 1)
    if not zl.is_contiguous():
        zl = zl.contiguous()
    y, mean, rstd = _BNReLUPool.apply(zl, gamma.contiguous(), beta.contiguous(), float(eps))
    return y.permute(0, 3, 1, 2), mean, rstd


def bn_relu_pool_loaded() -> bool:
    """Whether :func:`bn_relu_pool` is built and loaded in this process (never builds)."""
    return "bn_relu_pool" in _modules
