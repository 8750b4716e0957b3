"""ANIL training speed with and without the folded first batch norm, on speed.py's setting.

Conv-4, 28x28x1, 5-way 1-shot, 15 queries/class, meta-batch 32, one inner step of 0.4 on the
head; variants timed round-robin in one process, each checked against the float64 meta-gradient
of the PyTorch-layer path (``fold_bn = false``).

    python benchmarks/anil_speed.py --rounds 4
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import TASKS, _timed, machine, make_batch, make_model, meta_gradient, with_metamap

from metamap.tasks.batch import TaskBatch

VARIANTS = {
    "ANIL default (folded first BN, C++ first layer), whole meta-batch": ({}, TASKS),
    "ANIL default, chunks of 8 tasks": ({}, 8),
    "ANIL, cpp_kernels=false": ({"cpp_kernels": False}, TASKS),
    "ANIL, fold_bn=false (as before)": ({"fold_bn": False, "cpp_kernels": False}, TASKS),
}


def anil(options: dict, chunk: int, dtype=torch.float32):
    """(model, step): speed.py's metamap step with only the head adapting."""
    model = make_model().to(dtype)
    return model, with_metamap(model, 1, chunk=chunk, adapt="head", **options)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    from metamap.train.runtime import tune_allocator
    tune_allocator()
    print(f"machine: {machine()}\n")
    b = make_batch()
    b64 = TaskBatch(b.support_x.double(), b.support_y, b.query_x.double(), b.query_y, b.ways)
    ref = meta_gradient(*anil({"fold_bn": False, "cpp_kernels": False}, TASKS, torch.float64), b64)
    runs = {n: anil(o, c) for n, (o, c) in VARIANTS.items()}
    errors = {n: float((meta_gradient(m, st, b).double() - ref).norm() / ref.norm()) for n, (m, st) in runs.items()}
    times = {n: [] for n in VARIANTS}
    for _ in range(args.rounds):
        for n, (_, st) in runs.items():
            times[n].append(_timed(lambda st=st: st(b)))
    base = TASKS / statistics.median(times["ANIL, fold_bn=false (as before)"])
    print("| implementation | tasks/s | vs fold_bn=false | meta-grad rel. err vs float64 |")
    print("| --- | ---: | ---: | ---: |")
    for n in VARIANTS:
        rate = TASKS / statistics.median(times[n])
        print(f"| {n} | {rate:.2f} | {rate / base:.2f}x | {errors[n]:.1e} |")


if __name__ == "__main__":
    main()
