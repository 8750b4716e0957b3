"""Omniglot accuracy of the gradient-based learners: train a config, test it, record the time.

    python benchmarks/omniglot_gradient.py configs/maml-omniglot-5way1shot.toml --name maml
    python benchmarks/omniglot_gradient.py configs/maml-omniglot-anil-5way1shot.toml --name anil \
        --set train.steps=300

Trains with the shared trainer (validation on fixed episodes of the validation alphabets, best
checkpoint kept), tests the best checkpoint on ``eval.episodes`` fixed test episodes of the
evaluation alphabets, and writes benchmarks/results/omniglot_gradient-<name>.json plus a
Markdown row: test accuracy ± 95% CI, meta-batches, training wall time, tasks per second.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import facts_line, save  # noqa: E402

from metamap import config as configlib  # noqa: E402
from metamap.train.run import train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--name", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--run-dir", default=None)
    args = p.parse_args()
    cfg = configlib.resolve(args.config, args.overrides)
    run_dir = Path(args.run_dir or f"runs/bench-{args.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    print(facts_line(), flush=True)
    t0 = time.perf_counter()
    summary = train(cfg, run_dir, progress=False)
    total = time.perf_counter() - t0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = [r["tasks_per_s"] for r in records if "tasks_per_s" in r]
    command = " ".join(["python", "benchmarks/omniglot_gradient.py", *sys.argv[1:]])
    save(f"omniglot_gradient-{args.name}", {"command": command, "config": cfg, "summary": summary,
                                            "total_seconds": round(total, 1),
                                            "train_tasks_per_s": speeds[-1] if speeds else None})
    print("\n| run | setting | test accuracy (95% CI) | meta-batches | training wall time | tasks/s | total |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in summary["test"]:
        print(f"| {args.name} | {r['setting']} | {100 * r['mean']:.2f} ± {100 * r['ci95']:.2f} % | "
              f"{summary['steps']} | {summary['train_seconds'] / 60:.1f} min | "
              f"{speeds[-1] if speeds else float('nan'):.1f} | {total / 60:.1f} min |")


if __name__ == "__main__":
    main()
