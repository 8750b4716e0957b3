"""Omniglot accuracy of the metric, memory and baseline learners (issue 4), on a CPU budget.

    python benchmarks/omniglot_metric.py                       # every learner below, in turn
    python benchmarks/omniglot_metric.py matching relation     # some of them

Each learner trains from its config in configs/ through the shared trainer, then the shared
evaluator tests the final checkpoint on 1000 fixed episodes of the evaluation alphabets (lake
split): 5-way and 20-way 1-shot, 15 queries per class, mean ± 95% CI. For MANN it also
measures accuracy at the 1st..10th presentation of each class in 5-class x 10-instance test
sequences (as in the paper) and plots it. Results: benchmarks/results/omniglot_metric-<name>.json
and benchmarks/results/omniglot_metric-mann-presentations.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, facts_line, save, train_and_record
from common import mann_presentations as presentation_scores

from metamap import config as configlib
from metamap.train import checkpoint

ROOT = Path(__file__).resolve().parent.parent
RUNS = {
    "matching": "configs/matching-omniglot-20way.toml",
    "siamese": "configs/siamese-omniglot-20way.toml",
    "siamese-bce": "configs/siamese-omniglot-bce.toml",
    "relation": "configs/relation-omniglot-5way.toml",
    "finetune": "configs/finetune-omniglot-linear.toml",
    "finetune-cosine": "configs/finetune-omniglot-cosine.toml",
    "mann": "configs/mann-omniglot-5way.toml",
}
DEFAULT = ["matching", "siamese", "finetune", "mann", "relation"]


def mann_presentations(run_dir: Path, episodes: int = 1000, seed: int = 2024) -> dict[int, float]:
    """Accuracy at the k-th presentation (k = 1..10) over fixed 5-class x 10-instance test sequences."""
    loaded = checkpoint.load_learner(run_dir)
    return {k: mean for k, (mean, _) in presentation_scores(loaded.learner, loaded.config, episodes, seed).items()}


def plot_presentations(curve: dict[int, float], path: Path, note: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ks = sorted(curve)
    ax.plot(ks, [100 * curve[k] for k in ks], "o-", label="metamap MANN (this run)")
    # Santoro et al. 2016, Table 1 (one-hot labels, 5 classes): accuracy at the 1st..5th and 10th instance.
    paper = {1: 36.4, 2: 82.8, 3: 91.0, 4: 92.6, 5: 94.9, 10: 98.1}
    ax.plot(list(paper), list(paper.values()), "s--", color="grey", label="Santoro et al. 2016 (100k episodes)")
    ax.set_xlabel("presentation of the class in the sequence")
    ax.set_ylabel("accuracy (%)")
    ax.set_xticks(ks)
    ax.set_ylim(0, 100)
    ax.set_title("MANN, Omniglot 5 classes x 10 instances", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.text(0.01, 0.01, note, fontsize=6, color="grey")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(name: str, overrides: list[str], suffix: str = "") -> dict:
    config = configlib.resolve(ROOT / RUNS[name], overrides)
    run_dir = ROOT / "runs" / "omniglot_metric" / (name + suffix)
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    command = " ".join(["python benchmarks/omniglot_metric.py", name, *(f"--set {o}" for o in overrides),
                        *([f"--suffix={suffix}"] if suffix else [])])
    result = train_and_record(config, run_dir, f"omniglot_metric-{name}{suffix}", command, config_file=RUNS[name])
    summary, total = result["summary"], result["total_seconds"]
    if name == "mann":
        curve = mann_presentations(run_dir, config["eval"]["episodes"], config["eval"]["seed"])
        result["presentations"] = curve
        plot_presentations(curve, RESULTS / f"omniglot_metric-mann{suffix}-presentations.png",
                           f"{config['train']['steps']} batches x 16 episodes, "
                           f"{summary['train_seconds'] / 60:.1f} CPU-min training")
        save(f"omniglot_metric-{name}{suffix}", result)
    for r in summary["test"]:
        print(f"| {name} | {r['setting']} | {100 * r['mean']:.2f} ± {100 * r['ci95']:.2f} % | "
              f"{summary['train_seconds'] / 60:.1f} min | {total / 60:.1f} min |", flush=True)
    if "presentations" in result:
        print("MANN accuracy by presentation:", {k: round(100 * v, 1) for k, v in result["presentations"].items()})
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"which runs ({', '.join(RUNS)}); default: {' '.join(DEFAULT)}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every run (e.g. train.steps=10 for a smoke test)")
    p.add_argument("--suffix", default="", help="appended to the run folder and result file names")
    args = p.parse_args()
    unknown = sorted(set(args.names) - set(RUNS))
    if unknown:
        p.error(f"unknown run(s) {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    print(facts_line(), flush=True)
    print("| run | setting | test accuracy (95% CI) | training wall time | total |\n|---|---|---|---|---|", flush=True)
    for name in args.names or DEFAULT:
        run(name, args.overrides, args.suffix)


if __name__ == "__main__":
    main()
