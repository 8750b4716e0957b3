"""Scale-out and memory (issue 7): tasks/s at 1 and 2 torch.distributed ranks, and the peak
memory of second-order MAML with and without gradient checkpointing and meta-batch chunking.

    python benchmarks/scaling.py ranks      # MAML and ProtoNet, 1 rank x 1 and 2 threads, 2 ranks x 1 thread
    python benchmarks/scaling.py memory     # MAML, meta-batch 32, 1 and 5 inner steps
    python benchmarks/scaling.py            # both

Every measurement is a real ``metamap train`` run in a fresh process (``torchrun`` for several
ranks) on Omniglot shapes; tasks/s comes from the run's own log (the trainer's ``elapsed_s``),
over the steps after ``--warmup``, so start-up and the first, slower steps are left out. Peak
memory is the process's peak resident set (rank 0's, for several ranks); for the memory
benchmark glibc is told to unmap freed blocks at once, so that it follows the live tensors. Results go to stdout
as Markdown and to benchmarks/results/scaling-*.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import facts_line, median, save

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "maml": ["--learner", "maml", "--ways", "5", "--shots", "1", "--queries", "15", "--meta-batch", "32"],
    "protonet": ["--learner", "protonet", "--ways", "20", "--shots", "1", "--queries", "15", "--meta-batch", "4"],
}


def train(args: list[str], ranks: int, threads: int, steps: int, run_dir: Path, env: dict | None = None
          ) -> list[dict]:
    """One ``metamap train`` run -> its log records (one per step)."""
    common = ["train", "--run-dir", str(run_dir), "--no-test", "--quiet", "--steps", str(steps),
              "--threads", str(threads), "--set", "train.log_every=1", "--set", "train.val_every=0",
              "--set", f"train.checkpoint_every={steps}", *args]
    if ranks == 1:
        cmd = [sys.executable, "-m", "metamap", *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m", "metamap", *common]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {})}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def rate(records: list[dict], tasks_per_batch: int, warmup: int) -> float:
    """Tasks per second over the steps after ``warmup`` (median of per-step rates)."""
    times = [r["elapsed_s"] for r in records if "elapsed_s" in r]
    steps = [b - a for a, b in zip(times[warmup:], times[warmup + 1:])]
    return tasks_per_batch / median(steps)


def ranks_benchmark(steps: int, warmup: int) -> dict:
    layouts = [(1, 1), (1, 2), (2, 1)]          # (ranks, threads per rank)
    out = {}
    print("| learner | meta-batch | 1 rank x 1 thread | 1 rank x 2 threads | 2 ranks x 1 thread "
          "| 2 ranks vs 1 rank x 2 threads |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, args in SETTINGS.items():
        tpb = int(args[args.index("--meta-batch") + 1])
        rates = {}
        for ranks, threads in layouts:
            with tempfile.TemporaryDirectory() as d:
                records = train(args, ranks, threads, steps, Path(d) / "run")
            rates[f"{ranks}x{threads}"] = rate(records, tpb, warmup)
        out[name] = {"meta_batch": tpb, "tasks_per_s": rates}
        print(f"| {name} | {tpb} | {rates['1x1']:.2f} | {rates['1x2']:.2f} | {rates['2x1']:.2f} | "
              f"{rates['2x1'] / rates['1x2']:.2f}x |", flush=True)
    return out


# glibc returns every block over 64 KiB to the system when it is freed, so the peak resident set
# follows the tensors alive at once (the run-time allocator tuning, which keeps freed memory for
# speed, is off here: with it the peak RSS is the allocator's high-water mark instead).
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def memory_benchmark(steps: int, warmup: int, threads: int = 1) -> dict:
    whole, ckpt = ["--set", "train.chunk_tasks=0"], ["--set", "learner.grad_checkpoint=true"]
    variants = {"whole meta-batch": whole, "grad_checkpoint": [*whole, *ckpt],
                # The default, chunk_tasks = "auto", is eight tasks per pass for Conv-4 MAML.
                "chunk_tasks=8 (default)": [], "chunk_tasks=8 + grad_checkpoint": ckpt,
                "chunk_tasks=2": ["--set", "train.chunk_tasks=2"],
                "chunk_tasks=2 + grad_checkpoint": ["--set", "train.chunk_tasks=2", *ckpt]}
    out = {}
    print(f"| inner steps | variant | peak RSS (MB) | tasks/s ({threads} thread(s), allocator tuning off) |")
    print("| ---: | --- | ---: | ---: |")
    for inner in (1, 5):
        for label, extra in variants.items():
            args = [*SETTINGS["maml"], "--set", f"learner.inner_steps={inner}", *extra]
            with tempfile.TemporaryDirectory() as d:
                records = train([*args, "--set", "train.tune_allocator=false"], 1, threads, steps,
                                Path(d) / "run", LIVE_MEMORY_ENV)
            peak = max(r["peak_rss_mb"] for r in records)
            tps = rate(records, 32, warmup)
            out[f"{inner}:{label}"] = {"inner_steps": inner, "variant": label, "peak_rss_mb": peak, "tasks_per_s": tps}
            print(f"| {inner} | {label} | {peak:.0f} | {tps:.2f} |", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", nargs="*", default=["ranks", "memory"], choices=["ranks", "memory"])
    ap.add_argument("--steps", type=int, default=8, help="meta-batches per run")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of tasks/s")
    ap.add_argument("--memory-steps", type=int, default=3, help="meta-batches per run of the memory benchmark")
    args = ap.parse_args()
    print(facts_line() + f", load average at start {os.getloadavg()[0]:.1f}\n")
    for what in args.what:
        result = (ranks_benchmark(args.steps, args.warmup) if what == "ranks"
                  else memory_benchmark(args.memory_steps, min(args.warmup, args.memory_steps - 2)))
        print()
        save(f"scaling-{what}", {"command": "python benchmarks/scaling.py " + " ".join(sys.argv[1:]),
                                 "steps": args.steps, "warmup": args.warmup, "results": result})


if __name__ == "__main__":
    main()
