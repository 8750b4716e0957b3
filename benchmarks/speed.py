"""Second-order MAML speed, side by side in one process: metamap vs higher, TorchOpt, a plain loop.

Setting (issue 3): Conv-4 (64 channels, batch norm), 28x28x1 inputs, 5-way 1-shot, 15 queries
per class, meta-batch 32, inner step size 0.4, 1 and 5 inner steps, one Adam outer step per
meta-batch. Every implementation starts from the same weights and meta-batch; the meta-gradient
of each is compared with the exact one (the plain loop in float64) before timing. Implementations
are timed round-robin (one meta-batch each per round) so that load from other processes hits all
of them alike.

    python benchmarks/speed.py                      # 1 and 5 inner steps, 3 timed rounds
    python benchmarks/speed.py --steps 1 --rounds 2 --skip higher,torchopt

``higher`` and ``torchopt`` are optional (``pip install higher torchopt`` keeps torch as is);
missing ones are reported and skipped. Results go to stdout as a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metamap.algorithms.gradient import GradientLearner
from metamap.nets.backbones import Conv4
from metamap.nets.passes import CppFirstLayer
from metamap.tasks.batch import TaskBatch

WAYS, SHOTS, QUERIES, TASKS, LR = 5, 1, 15, 32, 0.4


def make_batch(seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(torch.randn(TASKS, WAYS * SHOTS, 1, 28, 28, generator=g),
                     torch.arange(WAYS).repeat_interleave(SHOTS).repeat(TASKS, 1),
                     torch.randn(TASKS, WAYS * QUERIES, 1, 28, 28, generator=g),
                     torch.arange(WAYS).repeat_interleave(QUERIES).repeat(TASKS, 1), WAYS)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Conv4(1, 64, 4, 28), nn.Linear(64, WAYS))


# -- the implementations: each a `step(batch)` that leaves the meta-gradient in .grad ---------
def plain_loop(model: nn.Module, steps: int):
    """One task at a time: torch.func.functional_call + autograd.grad(create_graph=True)."""
    def step(b: TaskBatch):
        theta = dict(model.named_parameters())
        for t in range(b.num_tasks):
            fast = dict(theta)
            for _ in range(steps):
                loss = F.cross_entropy(functional_call(model, fast, (b.support_x[t],)), b.support_y[t])
                grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
                fast = {n: v - LR * g for (n, v), g in zip(fast.items(), grads)}
            query = F.cross_entropy(functional_call(model, fast, (b.query_x[t],)), b.query_y[t])
            (query / b.num_tasks).backward()      # per task: frees each task's graph at once
    return step


def with_higher(model: nn.Module, steps: int):
    import higher
    inner = torch.optim.SGD(model.parameters(), lr=LR)

    def step(b: TaskBatch):
        for t in range(b.num_tasks):
            with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(F.cross_entropy(fmodel(b.support_x[t]), b.support_y[t]))
                (F.cross_entropy(fmodel(b.query_x[t]), b.query_y[t]) / b.num_tasks).backward()
    return step


def with_torchopt(model: nn.Module, steps: int):
    import torchopt
    inner = torchopt.MetaSGD(model, lr=LR)

    def step(b: TaskBatch):
        for t in range(b.num_tasks):
            state = torchopt.extract_state_dict(model)
            for _ in range(steps):
                inner.step(F.cross_entropy(model(b.support_x[t]), b.support_y[t]))
            (F.cross_entropy(model(b.query_x[t]), b.query_y[t]) / b.num_tasks).backward()
            torchopt.recover_state_dict(model, state)
    return step


def with_metamap(model: nn.Module, steps: int, chunk: int = TASKS, bf16: bool = False, wide: bool = True,
                 **options):
    """``chunk``: tasks per forward/backward pass, as the trainer's ``train.chunk_tasks`` runs them;
    ``bf16``: under bfloat16 autocast, as ``train.precision = "bf16"`` runs it; ``wide = False``:
    the C++ first layer's forward pass in float32 instead of its wide (double) pass."""
    learner = GradientLearner(model[0], model[1], 3, ways=WAYS, inner_steps=steps, inner_lr=LR, **options)
    learner.train()

    def step(b: TaskBatch):
        saved, CppFirstLayer.wide = CppFirstLayer.wide, wide
        try:
            for start in range(0, b.num_tasks, chunk):
                part = b.slice(start, min(start + chunk, b.num_tasks))
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss, _ = learner.meta_loss(part)
                (loss.float() * (part.num_tasks / b.num_tasks)).backward()
        finally:
            CppFirstLayer.wide = saved
    return step


IMPLEMENTATIONS = {
    "plain loop (torch.func, per task)": plain_loop,
    "higher 0.2.1": with_higher,
    "TorchOpt": with_torchopt,
    # The library default: the trainer runs a Conv-4 MAML meta-batch eight tasks per pass
    # (train.chunk_tasks = "auto" -> GradientLearner.preferred_chunk).
    "metamap (default: 8-task chunks, grouped, channels-last, fused BN-ReLU-pool, folded BN, C++ first layer)":
        lambda m, s: with_metamap(m, s, chunk=8),
    "metamap, chunks of 2 tasks": lambda m, s: with_metamap(m, s, chunk=2),
    "metamap, whole meta-batch in one pass": with_metamap,
    "metamap, chunks of 4 tasks": lambda m, s: with_metamap(m, s, chunk=4),
    "metamap, chunks of 1 task": lambda m, s: with_metamap(m, s, chunk=1),
    "metamap, cpp_kernels=false": lambda m, s: with_metamap(m, s, chunk=8, cpp_kernels=False),
    "metamap, C++ first layer in float32 (no wide pass)": lambda m, s: with_metamap(m, s, chunk=8, wide=False),
    "metamap, fold_bn=false": lambda m, s: with_metamap(m, s, chunk=8, fold_bn=False, cpp_kernels=False),
    "metamap, fold_bn=false with the C++ batch-norm kernel":
        lambda m, s: with_metamap(m, s, chunk=8, fold_bn=False),
    "metamap, fold_bn=false, channels_last=false with the C++ batch-norm kernel":
        lambda m, s: with_metamap(m, s, chunk=8, fold_bn=False, channels_last=False),
    "metamap, channels_last=false, fold_bn=false, cpp_kernels=false (grouped NCHW, PyTorch layers)":
        lambda m, s: with_metamap(m, s, chunk=8, channels_last=False, fold_bn=False, cpp_kernels=False),
    "metamap, fuse_bn_pool=false": lambda m, s: with_metamap(m, s, chunk=2, fuse_bn_pool=False),
    "metamap, channels_last=false": lambda m, s: with_metamap(m, s, chunk=2, channels_last=False),
    "metamap, backend=reference (per-task loop)": lambda m, s: with_metamap(m, s, backend="reference"),
    "metamap, train.precision=bf16 (bfloat16 autocast)": lambda m, s: with_metamap(m, s, chunk=2, bf16=True),
}
SKIP_KEYS = {"higher": "higher", "torchopt": "TorchOpt", "loop": "plain loop"}


def meta_gradient(model: nn.Module, step, b: TaskBatch) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    step(b)
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in model.parameters()])


def exact_meta_gradient(steps: int, b: TaskBatch) -> torch.Tensor:
    """The plain loop's meta-gradient in float64: the yardstick every fp32 implementation is
    compared with (fp32 implementations differ from each other and from it by rounding)."""
    model = make_model().double()
    b64 = TaskBatch(b.support_x.double(), b.support_y, b.query_x.double(), b.query_y, b.ways)
    return meta_gradient(model, plain_loop(model, steps), b64)


def flops_per_task(steps: int) -> float:
    """Floating-point operations of one task's second-order meta-gradient (convs and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = make_model()
    b = make_batch().slice(0, 1)
    counter = FlopCounterMode(display=False)
    with counter:
        plain_loop(model, steps)(b)
    return float(counter.get_total_flops())


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a, c = torch.randn(n, n), torch.randn(n, n)
    a @ c
    best = min(_timed(lambda: a @ c) for _ in range(repeats))
    return 2 * n ** 3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def geometric_mean(values: list[float]) -> float:
    """Of errors that sit on two levels (rounding and flips, see ``run``), steadier than the median."""
    return math.exp(sum(math.log(max(v, 1e-300)) for v in values) / len(values))


def machine() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown CPU")
    amx = any(ln.startswith("flags") and "amx_bf16" in ln for ln in lines)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} logical cores (AMX: {'yes' if amx else 'no'}), "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, Python {platform.python_version()}, "
            f"load average at start {load:.1f}")


def run(steps: int, rounds: int, names: list[str], peak: float, error_batches: int = 1) -> list[dict]:
    b = make_batch()
    models = {n: make_model() for n in names}
    impls, opts = {}, {}
    for n in names:
        try:
            impls[n] = IMPLEMENTATIONS[n](models[n], steps)
        except ImportError as e:
            print(f"# skipped {n}: {e}", file=sys.stderr)
    names = [n for n in names if n in impls]
    rows = {n: {"name": n, "errors": [], "times": []} for n in names}
    # Several batches, because over a few inner steps the fp32 error of one batch is a lottery: a
    # pooling winner or ReLU sign that rounding flips changes a task's whole adaptation, and the
    # same implementation errs by 1e-4 on one batch and 4e-2 on the next (see BENCHMARKS.md).
    for seed in range(error_batches):
        eb = make_batch(seed)
        ref = exact_meta_gradient(steps, eb)
        for n in names:
            g = meta_gradient(models[n], impls[n], eb).double()
            rows[n]["errors"].append(float((g - ref).norm() / ref.norm()))
    for n in names:
        rows[n]["rel_err"] = statistics.median(rows[n]["errors"])
        opts[n] = torch.optim.Adam(models[n].parameters(), lr=1e-3)
    for _ in range(rounds):
        for n in names:
            def full_step(n=n):
                opts[n].zero_grad(set_to_none=True)
                impls[n](b)
                opts[n].step()
            rows[n]["times"].append(_timed(full_step))
    flops = flops_per_task(steps)
    for r in rows.values():
        r["tasks_per_s"] = TASKS / statistics.median(r["times"])
        r["peak_fraction"] = r["tasks_per_s"] * flops / peak
    return list(rows.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", default="1,5", help="inner steps to measure, comma separated")
    ap.add_argument("--rounds", type=int, default=3, help="timed meta-batches per implementation")
    ap.add_argument("--skip", default="", help="comma separated: loop, higher, torchopt")
    ap.add_argument("--only", default="", help="substrings of implementation names to run, separated by commas "
                    "(or by | when a substring holds a comma)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--error-batches", type=int, default=1,
                    help="meta-batches (seeds 0..N-1) over which the meta-gradient error is measured; "
                         "the table gives the median and, for N > 1, the geometric mean and the largest")
    ap.add_argument("--errors-json", type=Path, help="also write every batch's error per implementation here")
    ap.add_argument("--no-allocator", action="store_true", help="leave glibc's allocator settings alone")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.no_allocator:
        from metamap.train.runtime import tune_allocator
        tune_allocator()
    skip = {SKIP_KEYS[s] for s in args.skip.split(",") if s}
    names = [n for n in IMPLEMENTATIONS if not any(n.startswith(s) for s in skip)]
    if args.only:
        keys = args.only.split("|" if "|" in args.only else ",")
        names = [n for key in keys for n in names if key in n]
    print(f"machine: {machine()}")
    peak = matmul_peak()
    print(f"fp32 matmul 2048^3 now: {peak / 1e9:.0f} GFLOP/s (the 'peak' below)\n")
    for steps in (int(s) for s in args.steps.split(",")):
        start_peak = peak
        rows = run(steps, args.rounds, names, peak, args.error_batches)
        peak_after = matmul_peak()
        print(f"### {steps} inner step(s), meta-batch {TASKS}, {args.rounds} rounds "
              f"(matmul peak {start_peak / 1e9:.0f} -> {peak_after / 1e9:.0f} GFLOP/s during the run)\n")
        many = args.error_batches > 1
        err_head = (f"meta-grad rel. err vs float64, median [geometric mean] (largest) of {args.error_batches} batches"
                    if many
                    else "meta-grad rel. err vs float64")
        print(f"| implementation | tasks/s | vs fastest peer | of matmul peak | {err_head} |")
        print("| --- | ---: | ---: | ---: | ---: |")
        peers = [r["tasks_per_s"] for r in rows if not r["name"].startswith("metamap")]
        best = max(peers) if peers else float("nan")
        for r in rows:
            print(f"| {r['name']} | {r['tasks_per_s']:.2f} | {r['tasks_per_s'] / best:.2f}x | "
                  f"{100 * r['peak_fraction']:.0f}% | {r['rel_err']:.1e}"
                  + (f" [{geometric_mean(r['errors']):.1e}] ({max(r['errors']):.1e})" if many else "") + " |")
        print()
        if args.errors_json:
            old = json.loads(args.errors_json.read_text()) if args.errors_json.exists() else {}
            old[f"{steps} steps"] = {r["name"]: r["errors"] for r in rows}
            args.errors_json.write_text(json.dumps(old, indent=1) + "\n")


if __name__ == "__main__":
    main()
