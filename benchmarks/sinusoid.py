"""Sinusoid regression benchmark: MAML vs the pre-trained baseline, MSE after k adaptation steps.

Trains ``configs/sinusoid-maml.toml`` and ``configs/sinusoid-pretrained.toml`` (the same network
trained on all tasks jointly, no inner loop) with the shared trainer, then scores both on the
same fixed test tasks (10-shot, 100 query points each) after 0, 1, 5 and 10 gradient steps of
size 0.01, and draws the PNG plot of a few test tasks.

    python benchmarks/sinusoid.py                   # the configs' number of steps
    python benchmarks/sinusoid.py --steps 2000 --episodes 500

Results: benchmarks/results/sinusoid.json, benchmarks/results/sinusoid-{maml,pretrained}.png,
and a Markdown table on stdout.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import RESULTS, facts_line, save  # noqa: E402

from metamap import config as configlib  # noqa: E402
from metamap.registry import data_source  # noqa: E402
from metamap.report.regression import regression_tasks  # noqa: E402
from metamap.train import checkpoint  # noqa: E402
from metamap.train.evaluate import evaluate  # noqa: E402
from metamap.train.run import train  # noqa: E402

STEPS_TO_SCORE = (0, 1, 5, 10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=0, help="meta-training batches (0 = the configs' value)")
    ap.add_argument("--episodes", type=int, default=1000, help="fixed test tasks")
    ap.add_argument("--run-root", default="runs")
    args = ap.parse_args()
    print(facts_line(), flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: dict = {}
    for name in ("maml", "pretrained"):
        overrides = [f"train.steps={args.steps}"] if args.steps else []
        cfg = configlib.resolve(ROOT / "configs" / f"sinusoid-{name}.toml", overrides)
        run_dir = Path(args.run_root) / f"bench-sinusoid-{name}-{stamp}"
        t0 = time.perf_counter()
        summary = train(cfg, run_dir, progress=False, run_test=False, echo=lambda *a: None)
        wall = time.perf_counter() - t0
        learner = checkpoint.load_learner(run_dir / "best").learner
        source = data_source(cfg)
        sampler = source.sampler(cfg, "test", 1, 10, 100, 1, cfg["eval"]["seed"])
        scores = {}
        for k in STEPS_TO_SCORE:
            learner.inner_steps_eval = k
            r = evaluate(learner, sampler, args.episodes, progress=False, setting=f"{k} steps")
            scores[k] = {"mse": r.mean, "ci95": r.ci95}
        torch.manual_seed(0)
        png = RESULTS / f"sinusoid-{name}.png"
        RESULTS.mkdir(parents=True, exist_ok=True)
        regression_tasks(learner, sampler, png, ids=(0, 1, 2, 3), steps=(1, 10))
        results[name] = {"config": cfg, "train_seconds": round(wall, 1), "steps": summary["steps"],
                         "scores": scores, "plot": str(png.relative_to(ROOT))}
        print(f"{name}: trained {summary['steps']} batches in {wall / 60:.1f} min; plot {png}", flush=True)
    command = " ".join(["python", "benchmarks/sinusoid.py", *sys.argv[1:]])
    save("sinusoid", {"command": command, "episodes": args.episodes, "results": results})
    print(f"\nsinusoid 10-shot, {args.episodes} test tasks x 100 query points, MSE ± 95% CI:\n")
    print("| model | " + " | ".join(f"{k} step{'s' if k != 1 else ''}" for k in STEPS_TO_SCORE) + " | train time |")
    print("|---|" + "---:|" * (len(STEPS_TO_SCORE) + 1))
    for name, r in results.items():
        cells = " | ".join(f"{r['scores'][k]['mse']:.3f} ± {r['scores'][k]['ci95']:.3f}" for k in STEPS_TO_SCORE)
        print(f"| {name} | {cells} | {r['train_seconds'] / 60:.1f} min |")


if __name__ == "__main__":
    main()
