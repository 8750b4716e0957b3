"""How much memory is left, and refusing a data set that would not fit before it is decoded.

A data set too large for the machine would otherwise fill the memory image by image until the
kernel kills the process (or others with it); the estimate is known from the number and size
of the images before the first one is read.
"""
from __future__ import annotations

from pathlib import Path

from metamap.errors import DataError

# What may be planned for one data set: the rest is left to the model, the other processes and the page cache.
SHARE = 0.8


def _read_int(path: str, key: str | None = None) -> int | None:
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    if key is not None:
        line = next((x for x in text.splitlines() if x.startswith(key + ":")), None)
        return int(line.split()[1]) * 1024 if line else None      # /proc/meminfo counts kB
    text = text.strip()
    return int(text) if text.isdigit() else None


def available_bytes() -> int | None:
    """Memory this process can still take: the system's MemAvailable, or what its cgroup's limit or
    its address-space limit leaves if that is less; ``None`` where none can be read."""
    found = [_read_int("/proc/meminfo", "MemAvailable")]
    for limit, used in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        cap, now = _read_int(limit), _read_int(used)
        if cap is not None and now is not None and cap < 1 << 60:
            found.append(max(cap - now, 0))
    found.append(_address_space_left())
    found = [x for x in found if x is not None]
    return min(found) if found else None


def _address_space_left() -> int | None:
    """What an address-space limit (``ulimit -v``, RLIMIT_AS) leaves this process, if one is set."""
    import resource
    cap = resource.getrlimit(resource.RLIMIT_AS)[0]
    if cap == resource.RLIM_INFINITY:
        return None
    size = _read_int("/proc/self/status", "VmSize")
    return None if size is None else max(cap - size, 0)


def human(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def image_bytes(count: int, shape: tuple[int, ...]) -> int:
    """Bytes of ``count`` uint8 images of ``shape``."""
    size = count
    for d in shape:
        size *= d
    return size


def check_fits(need: int, what: str, fix: str) -> None:
    """Refuse (:class:`DataError`, with the estimate) to allocate ``need`` bytes for ``what`` when
    that is more than :data:`SHARE` of the memory left."""
    left = available_bytes()
    if left is not None and need > SHARE * left:
        raise DataError(f"{what} needs about {human(need)} of memory, more than this machine can spare "
                        f"({human(left)} available, of which at most {SHARE:.0%} is planned for it); {fix}")


def images_array(count: int, shape: tuple[int, ...], what: str):
    """``np.empty((count, *shape), uint8)`` for ``what``, refused first if it would not fit."""
    import numpy as np
    check_fits(image_bytes(count, shape), f"{what} ({count:,} images of {'x'.join(map(str, shape))})",
               "choose a smaller data.image_size")
    return np.empty((count, *shape), dtype=np.uint8)


def check_model_fits(build, what: str) -> None:
    """Refuse a model whose weights cannot fit, before they are allocated: ``build()`` runs once on
    PyTorch's meta device (shapes only, no memory) to count them. Training holds each weight about
    four times (the weight, its gradient, two optimizer moments)."""
    import torch
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = build()
        tensors = [*model.parameters(), *model.buffers()]
    except Exception:       # a builder that computes with its tensors cannot run on the meta device: no estimate
        return
    count = sum(t.numel() for t in tensors)
    check_fits(4 * sum(t.numel() * t.element_size() for t in tensors),
               f"{what} ({count:,} weights, each held as weight, gradient and two optimizer moments)",
               "choose smaller sizes (e.g. model.hidden)")


def graph_bytes_per_example(learner, shape: tuple[int, ...]) -> int:
    """A lower bound of the bytes one example of ``shape`` keeps for a backward pass of ``learner``
    (training, or adaptation by gradient steps): for images, the output of the first convolution with
    the batch norm and ReLU outputs kept beside it; without a convolution, its float32 input once more;
    0 for other examples (vectors: small next to their batch)."""
    import torch
    if len(shape) != 3:
        return 0
    c, h, w = shape
    conv = next((m for m in learner.modules() if isinstance(m, torch.nn.Conv2d)), None)
    return 3 * conv.out_channels * (h // conv.stride[0]) * (w // conv.stride[1]) * 4 if conv else 4 * c * h * w


def input_bytes(shape: tuple[int, ...]) -> int:
    """Bytes of one float32 input of ``shape``."""
    return 4 * image_bytes(1, tuple(shape))
