"""Accuracy benchmark: train a config to a checkpoint, test it, record accuracy ± CI and wall time.

    python benchmarks/protonet_omniglot.py configs/protonet-omniglot.toml --name default
    python benchmarks/protonet_omniglot.py configs/protonet-omniglot-30min.toml --name 30min

Any learner's config works (the script only calls the shared trainer and evaluator). Results go
to benchmarks/results/<name>.json and are printed as a Markdown table row.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import facts_line, save

from metamap import config as configlib
from metamap.train.run import train


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
    summary = train(cfg, run_dir, progress=True)
    total = time.perf_counter() - t0
    command = " ".join(["python", "benchmarks/protonet_omniglot.py", *sys.argv[1:]])
    save(args.name, {"command": command, "config": cfg, "summary": summary, "total_seconds": round(total, 1)})
    print("\n| run | setting | test accuracy (95% CI) | training wall time | total |")
    print("|---|---|---|---|---|")
    for r in summary["test"]:
        print(f"| {args.name} | {r['setting']} | {100 * r['mean']:.2f} ± {100 * r['ci95']:.2f} % | "
              f"{summary['train_seconds'] / 60:.1f} min | {total / 60:.1f} min |")


if __name__ == "__main__":
    main()
