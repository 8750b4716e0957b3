"""Which precision a run uses: ``train.precision = "auto"`` resolved against the hardware and learner.

``auto`` means bfloat16 autocast where the device computes bf16 natively (a CPU with AMX or
AVX-512 BF16, a CUDA GPU that supports it) *and* the learner's accuracy under bf16 was
measured unchanged on its default experiment (``MetaLearner.auto_bf16``); fp32 everywhere
else. On a CPU without bf16 instructions autocast emulates bf16 and is slower than fp32.
"""
from __future__ import annotations

from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# /proc/cpuinfo flags of native bf16 arithmetic, in the order they are named.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The instruction-set flags of this CPU (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    line = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[1].split()) if ":" in line else set()


def native_bf16(device: torch.device, flags: set[str] | None = None) -> str | None:
    """What gives ``device`` native bf16 arithmetic (e.g. ``"avx512_bf16"``), or ``None``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device) if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        flags = cpu_flags() if flags is None else flags
        found = [f for f in CPU_BF16_FLAGS if f in flags]
        return " and ".join(found) if found else None
    return None


def resolve_precision(requested: str, device: torch.device | str, learner, flags: set[str] | None = None
                      ) -> tuple[str, str]:
    """``(precision, why)``: the precision to run (fp32, bf16 or fp16) and a line saying why."""
    device = torch.device(device)
    if requested != "auto":
        return requested, f"train.precision = {requested}"
    name = getattr(learner, "name", type(learner).__name__)
    if not getattr(learner, "auto_bf16", False):
        return "fp32", (f"train.precision = auto -> fp32: {name} is not run in bf16 by default (not measured "
                        "unchanged, or its gradients move too far: BENCHMARKS.md); train.precision = bf16 forces it")
    hardware = native_bf16(device, flags)
    if hardware is None:
        return "fp32", f"train.precision = auto -> fp32: no native bf16 on this {device.type}"
    return "bf16", (f"train.precision = auto -> bf16 autocast: native bf16 ({hardware}), and {name}'s "
                    "accuracy under bf16 measured unchanged (BENCHMARKS.md)")


def autocast(precision: str, device: torch.device | str):
    """The autocast context of ``precision`` (a null context for fp32)."""
    import contextlib
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(torch.device(device).type, dtype=dtype)
