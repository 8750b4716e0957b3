"""Accuracy benchmark for any learner: train a config, test it, record accuracy ± CI and times.

    python benchmarks/omniglot.py configs/protonet-omniglot.toml --name default-1500
    python benchmarks/omniglot.py configs/maml-omniglot-5way1shot.toml --name omniglot_gradient-maml \
        --set episode.tasks_per_batch=8 --set train.steps=800
    python benchmarks/omniglot.py configs/protonet-omniglot.toml --name protonet-bf16 --set train.precision=bf16

Only the shared trainer and evaluator run (validation and best checkpoint as the config says;
the test evaluates on the config's fixed test episodes). Writes benchmarks/results/<name>.json
(resolved config, machine facts, per-setting results, wall times, training tasks/s) and prints
a Markdown row per test setting.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import facts_line, train_and_record

from metamap import config as configlib


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--name", required=True, help="result file benchmarks/results/NAME.json")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its last checkpoint (e.g. after SIGTERM)")
    args = p.parse_args()
    if args.resume and not args.run_dir:
        p.error("--resume needs --run-dir")
    run_dir = Path(args.run_dir or f"runs/bench-{args.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    base = None
    if args.resume:
        from metamap.train import checkpoint
        base = checkpoint.read_meta(run_dir / "last")[1]["config"]
    cfg = configlib.resolve(args.config, args.overrides, base=base)
    if cfg["train"].get("threads"):
        import torch
        torch.set_num_threads(cfg["train"]["threads"])      # so the facts below say what the run uses
    print(facts_line(), flush=True)
    command = " ".join(["python", "benchmarks/omniglot.py", *sys.argv[1:]])
    result = train_and_record(cfg, run_dir, args.name, command, progress=sys.stderr.isatty(), resume=args.resume)
    summary = result["summary"]
    print("\n| run | setting | test accuracy (95% CI) | meta-batches | training wall time | tasks/s | total |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in summary["test"]:
        print(f"| {args.name} | {r['setting']} | {100 * r['mean']:.2f} ± {100 * r['ci95']:.2f} % | "
              f"{summary['steps']} | {summary['train_seconds'] / 60:.1f} min | "
              f"{result['train_tasks_per_s'] or float('nan'):.2f} | {result['total_seconds'] / 60:.1f} min |")


if __name__ == "__main__":
    main()
