"""Optional C++ kernels, built explicitly with the local C++ compiler.

:func:`conv_pool_relu` runs a first layer -- per-task convolution, bias, 2x2 max-pool, ReLU --
without ever writing its full-resolution feature map (see ``conv_pool.cpp``). It is
differentiable twice (MAML's second-order meta-gradient needs exactly that) with respect to the
kernel and bias; its input is data and gets no gradient.

:func:`build` compiles and loads the kernel. The fast backend calls it when it is created for a
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

_SOURCE = Path(__file__).with_name("conv_pool.cpp")
_lock = threading.Lock()
_module = None
_failed: str | None = None


def extension_name() -> tuple[str, list[str]]:
    """The cached extension's name and its compiler flags."""
    flags = ["-O3", "-fopenmp"]
    name = "metamap_conv_pool"
    if os.environ.get("METAMAP_KERNELS_PORTABLE") != "1":
        # Built for this CPU; the name carries its instruction sets, so that a cache shared
        # between machines (a home directory on a cluster) never hands one CPU's build to another.
        flags.append("-march=native")
        name += "_" + _cpu_tag()
    return name, flags


def build(verbose: bool = False):
    """Compile (or load from the cache) the extension; ``None`` if it cannot be built here (warns once)."""
    global _module, _failed
    if _module is not None or _failed is not None:
        return _module
    with _lock:
        if _module is None and _failed is None:
            try:
                from torch.utils.cpp_extension import load as compile_and_load
                name, flags = extension_name()
                build_dir = _build_dir(name, verbose)
                with _file_lock(build_dir.parent / f"{name}.metamap-lock"):
                    _clear_stale_baton(build_dir)
                    _module = compile_and_load(name, [str(_stable_source(build_dir.parent, name))],
                                               extra_cflags=flags, extra_ldflags=["-fopenmp"],
                                               build_directory=str(build_dir), verbose=verbose)
            except Exception as e:  # any build failure means: use the PyTorch layers
                _failed = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                warnings.warn(
                    f"metamap could not compile its C++ kernel ({_failed}); using the PyTorch layers "
                    f"instead (same results, slower). Install a C++ compiler and `pip install ninja`, "
                    f"or set learner.cpp_kernels = false to silence this.", RuntimeWarning, stacklevel=3)
    return _module


def failure() -> str | None:
    """Why the last :func:`build` failed (``None`` if it did not)."""
    return _failed


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


def _stable_source(folder: Path, name: str) -> Path:
    """A copy of the kernel's source at a path that does not depend on where metamap is installed.

    The build rules name the source file, so two installs (two checkouts, a venv and a clone)
    compiling from their own paths would each rebuild the shared cached extension in turn."""
    src = folder / f"{name}.src" / _SOURCE.name
    text = _SOURCE.read_bytes()
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
    """Whether the kernel is built and loaded in this process (never builds)."""
    return _module is not None


def available() -> bool:
    """Whether the kernel can be used here, building it first if need be."""
    return build() is not None


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
    ``bias [T, C]`` -> grouped channels-last ``[N, T*C, H', W']``. Needs :func:`build` first.
    """
    t, c, cin, kh, kw = weight.shape
    w = weight.reshape(t, c, cin * kh * kw).transpose(1, 2).contiguous()      # [T, D, C]
    padded = F.pad(x, (padding,) * 4).contiguous()                               # no bounds checks
    out = _ConvPoolReLU.apply(padded, w, bias.contiguous(), kh, kw, padding)
    n, ho, wo = out.shape[:3]
    return out.reshape(n, ho, wo, t * c).permute(0, 3, 1, 2)
