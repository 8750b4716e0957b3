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
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from speed import TASKS, _timed, machine, make_batch, make_model

from metamap.algorithms.gradient import GradientLearner
from metamap.tasks.batch import TaskBatch

VARIANTS = {
    "ANIL default (folded first BN, C++ first layer), whole meta-batch": ({}, TASKS),
    "ANIL default, chunks of 8 tasks": ({}, 8),
    "ANIL, cpp_kernels=false": ({"cpp_kernels": False}, TASKS),
    "ANIL, fold_bn=false (as before)": ({"fold_bn": False, "cpp_kernels": False}, TASKS),
}


def anil(options: dict, dtype=torch.float32) -> GradientLearner:
    model = make_model().to(dtype)
    return GradientLearner(model[0], model[1], 3, ways=5, inner_steps=1, inner_lr=0.4, adapt="head",
                           **options).train()


def step(learner: GradientLearner, b: TaskBatch, chunk: int) -> None:
    for start in range(0, b.num_tasks, chunk):
        part = b.slice(start, min(start + chunk, b.num_tasks))
        loss, _ = learner.meta_loss(part)
        (loss * (part.num_tasks / b.num_tasks)).backward()


def gradient(learner: GradientLearner, b: TaskBatch, chunk: int) -> torch.Tensor:
    learner.zero_grad(set_to_none=True)
    step(learner, b, chunk)
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten().double()
                      for p in learner.model.parameters()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    from metamap.train.runtime import tune_allocator
    tune_allocator()
    print(f"machine: {machine()}\n")
    b = make_batch()
    b64 = TaskBatch(b.support_x.double(), b.support_y, b.query_x.double(), b.query_y, b.ways)
    ref = gradient(anil({"fold_bn": False, "cpp_kernels": False}, torch.float64), b64, TASKS)
    learners = {n: anil(o) for n, (o, _) in VARIANTS.items()}
    errors = {n: float((gradient(learners[n], b, c) - ref).norm() / ref.norm()) for n, (_, c) in VARIANTS.items()}
    times = {n: [] for n in VARIANTS}
    for _ in range(args.rounds):
        for n, (_, chunk) in VARIANTS.items():
            times[n].append(_timed(lambda n=n, chunk=chunk: step(learners[n], b, chunk)))
    base = TASKS / statistics.median(times["ANIL, fold_bn=false (as before)"])
    print("| implementation | tasks/s | vs fold_bn=false | meta-grad rel. err vs float64 |")
    print("| --- | ---: | ---: | ---: |")
    for n in VARIANTS:
        rate = TASKS / statistics.median(times[n])
        print(f"| {n} | {rate:.2f} | {rate / base:.2f}x | {errors[n]:.1e} |")


if __name__ == "__main__":
    main()
