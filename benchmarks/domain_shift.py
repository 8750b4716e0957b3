"""Cross-domain few-shot benchmark: Omniglot-trained checkpoints scored on shifted domains.

    python benchmarks/domain_shift.py run --checkpoints protonet=runs/src-protonet maml=runs/src-maml \
        finetune=runs/src-finetune --episodes 600 --threads 1
    python benchmarks/domain_shift.py table            # the Markdown table of what was measured so far
    python benchmarks/domain_shift.py plot             # benchmarks/results/domain_shift.png

Every cell is ``metamap eval --checkpoint C --data TARGET`` (the one evaluator, 5-way, 15 queries
per class, fixed episodes of the target's test classes, mean ± 95% CI); "protonet+ft" is the
ProtoNet checkpoint with automatic test-time adaptation (``eval.finetune=true``: the weight of the
support set's batch-norm statistics, then the fine-tuning's learning rate and steps, each kept at
"none" unless its paired gain is clear on 30 episodes of the target's validation classes). Results are appended to
benchmarks/results/domain_shift.json cell by cell, so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, facts_line

TARGETS = {
    "fashionmnist": ["data.name='fashionmnist'"],
    "glyphs": ["data.name='glyphs'"],
    "omniglot-noise2": ["data.name='corrupted'", "data.corruption='noise'", "data.severity=2"],
    "omniglot-noise4": ["data.name='corrupted'", "data.corruption='noise'", "data.severity=4"],
}
# Omniglot has 20 drawings per character: its largest setting is 15 shots with 5 queries.
SHOTS = {"fashionmnist": [1, 5, 20], "glyphs": [1, 5, 20], "omniglot-noise2": [1, 5, 15],
         "omniglot-noise4": [1, 5, 15]}
FT_STEPS = [5, 10, 20]
FT_LRS = [0.0, 1e-4, 1e-3, 1e-2]
OUT = RESULTS / "domain_shift.json"
# Cells of the first test-time fine-tuning (learning rate and steps by the best mean on 5 validation
# episodes, P>M>F's augmentation, no batch-norm statistics), kept in the results, not in the table.
RETIRED = {"protonet+ft-mean5"}


def cells(learners: dict[str, str], targets, shots_filter):
    for shots in (1, 5, 20, 15):
        if shots not in shots_filter:
            continue
        for target in targets:
            if shots not in SHOTS[target]:
                continue
            for name in learners:
                yield name, target, shots


def load() -> list[dict]:
    return json.loads(OUT.read_text()) if OUT.exists() else []


def save(rows: list[dict]) -> None:
    """Write the results, one line per list of per-episode scores (the file stays readable)."""
    text = json.dumps([{**r, "scores": "@"} if "scores" in r else r for r in rows], indent=1)
    for r in rows:
        if "scores" in r:
            text = text.replace('"scores": "@"', '"scores": ' + json.dumps(r["scores"]), 1)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(f".json.{os.getpid()}.tmp")       # several runs may append at once
    tmp.write_text(text)
    tmp.replace(OUT)


def run(args) -> None:
    import torch

    from metamap.train.run import evaluate_checkpoint
    torch.set_num_threads(args.threads)
    print(facts_line(), flush=True)
    learners = dict(kv.split("=", 1) for kv in args.checkpoints)
    if "protonet" in learners and not args.no_ft:
        learners["protonet+ft"] = learners["protonet"]
    if args.learners:
        learners = {name: path for name, path in learners.items() if name in args.learners}
    done = {(r["learner"], r["target"], r["shots"]): r for r in load()}
    for name, target, shots in cells(learners, args.targets, args.shots):
        if (name, target, shots) in done:
            if args.backfill_scores and "scores" not in done[name, target, shots]:
                backfill(done[name, target, shots])
            continue
        queries = 5 if shots == 15 else 15
        overrides = [*TARGETS[target], "eval.ways=[5]", f"eval.shots=[{shots}]", f"eval.queries={queries}",
                     f"eval.episodes={args.episodes}", f"train.threads={args.threads}"]
        if name.endswith("+ft"):
            overrides += ["eval.finetune=true", f"eval.finetune_steps_grid={sorted(args.ft_steps)}",
                          f"eval.finetune_lrs={sorted(args.ft_lrs)}", f"eval.finetune_episodes={args.ft_episodes}"]
            if args.ft_augment:
                overrides.append(f"eval.finetune_augment={args.ft_augment}")
        t0, c0 = time.perf_counter(), time.process_time()
        result = evaluate_checkpoint(learners[name], overrides, progress=False, echo=lambda *_: None)[0]
        row = {"learner": name, "target": target, "shots": shots, "queries": queries,
               "checkpoint": learners[name], "overrides": overrides, "mean": result.mean, "ci95": result.ci95,
               "episodes": result.episodes, "seed": result.seed, "finetune": result.finetune,
               "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
               "load": [round(x, 2) for x in os.getloadavg()], "threads": args.threads,
               "date": time.strftime("%Y-%m-%d %H:%M"),
               # per-episode accuracies: the same episodes for every learner, so differences can be paired
               "scores": [round(float(x), 6) for x in result.scores],
               "command": "metamap eval --checkpoint " + learners[name] + " " +
                          " ".join(f"--set {o}" for o in overrides)}
        rows = load()
        rows.append(row)
        save(rows)
        tuned = f" ({tuning(result.finetune)})" if result.finetune else ""
        print(f"{name:12s} {target:16s} {shots:2d}-shot: {100 * result.mean:.2f} ± {100 * result.ci95:.2f} %"
              f"{tuned}  [{row['cpu_s']:.0f} CPU s]", flush=True)


def backfill(row: dict) -> None:
    """Add the per-episode scores to a cell measured before they were stored: the cell is
    measured again, and must give the stored mean exactly (episodes are fixed by the seed)."""
    from metamap.train.run import evaluate_checkpoint
    result = evaluate_checkpoint(row["checkpoint"], row["overrides"], progress=False, echo=lambda *_: None)[0]
    if result.mean != row["mean"] or result.ci95 != row["ci95"]:
        raise SystemExit(f"{row['learner']} {row['target']} {row['shots']}-shot: measured again "
                         f"{result.mean!r} ± {result.ci95!r}, stored {row['mean']!r} ± {row['ci95']!r}")
    rows = load()
    for r in rows:
        if (r["learner"], r["target"], r["shots"]) == (row["learner"], row["target"], row["shots"]):
            r["scores"] = [round(float(x), 6) for x in result.scores]
    save(rows)
    print(f"{row['learner']:12s} {row['target']:16s} {row['shots']:2d}-shot: scores added (same mean)", flush=True)


def tuning(ft: dict) -> str:
    """What test-time adaptation a cell used: batch-norm weight, learning rate, steps."""
    parts = [f"bn {ft['norm']:g}"] if ft.get("norm") else []
    parts.append(f"lr {ft['lr']:g}, {ft['steps']} st." if ft["lr"] > 0 and ft["steps"] > 0 else "no steps")
    if ft.get("params", "all") != "all" and ft["lr"] > 0:
        parts.append(f"{ft['params']} only")
    return ", ".join(parts)


def paired(a: dict | None, b: dict | None) -> str:
    """Mean ± 95 % CI of the per-episode difference a - b (the same episodes), in points."""
    if not a or not b or "scores" not in a or "scores" not in b:
        return "—"
    d = [x - y for x, y in zip(a["scores"], b["scores"], strict=True)]
    return f"{100 * statistics.mean(d):+.2f} ± {100 * 1.96 * statistics.stdev(d) / len(d) ** 0.5:.2f}"


def table(args) -> None:
    rows = load()
    rows = [r for r in rows if r["learner"] not in RETIRED]
    learners = list(dict.fromkeys(r["learner"] for r in rows))
    targets = list(dict.fromkeys(r["target"] for r in rows))
    print("| target | shots | " + " | ".join(learners) + " | protonet+ft - protonet (paired) |")
    print("|---|---:|" + "---:|" * (len(learners) + 1))
    for target in targets:
        for shots in SHOTS[target]:
            got = {r["learner"]: r for r in rows if r["target"] == target and r["shots"] == shots}
            if not got:
                continue
            def cell(name):
                r = got.get(name)
                if r is None:
                    return "—"
                extra = f" ({tuning(r['finetune'])})" if r.get("finetune") else ""
                return f"{100 * r['mean']:.2f} ± {100 * r['ci95']:.2f}{extra}"
            print(f"| {target} | {shots} | " + " | ".join(cell(n) for n in learners) + " | " +
                  paired(got.get("protonet+ft"), got.get("protonet")) + " |")


def plot(args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in load() if r["learner"] not in RETIRED]
    learners = list(dict.fromkeys(r["learner"] for r in rows))
    targets = [t for t in TARGETS if any(r["target"] == t for r in rows)]
    fig, axes = plt.subplots(1, len(targets), figsize=(3.6 * len(targets), 3.4), squeeze=False)
    for ax, target in zip(axes[0], targets):
        for k, name in enumerate(learners):
            got = sorted((r["shots"], r["mean"], r["ci95"]) for r in rows
                         if r["target"] == target and r["learner"] == name)
            if got:
                shots, mean, ci = zip(*got)
                x = [SHOTS[target].index(s) + (k - (len(learners) - 1) / 2) * 0.06 for s in shots]
                ax.errorbar(x, [100 * m for m in mean], yerr=[100 * c for c in ci], marker="o", ms=4,
                            capsize=3, label=name)
        ax.set_xticks(range(len(SHOTS[target])), [str(s) for s in SHOTS[target]])
        ax.set_title(f"Omniglot -> {target}", fontsize=10)
        ax.set_xlabel("shots (5-way)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy, % (95 % CI, 600 episodes)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    out = OUT.with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--checkpoints", nargs="+", required=True, metavar="NAME=RUN_DIR")
    r.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    r.add_argument("--shots", nargs="+", type=int, default=[1, 5, 15, 20])
    r.add_argument("--episodes", type=int, default=600)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--no-ft", action="store_true", help="skip ProtoNet + test-time fine-tuning")
    r.add_argument("--ft-steps", nargs="+", type=int, default=FT_STEPS,
                   help="protonet+ft: the steps grid searched along one trajectory (default: 5 10 20)")
    r.add_argument("--ft-lrs", nargs="+", type=float, default=FT_LRS,
                   help="protonet+ft: the learning rates tried (0 = no fine-tuning; default: 0 1e-4 1e-3 1e-2)")
    r.add_argument("--ft-episodes", type=int, default=30, help="protonet+ft: validation episodes of the choice")
    r.add_argument("--ft-augment", nargs="+", choices=["flip", "color", "translation"],
                   help="protonet+ft: the augmentations of the support set (default: the option's)")
    r.add_argument("--backfill-scores", action="store_true",
                   help="measure again the selected cells stored without per-episode scores, and add them")
    r.add_argument("--learners", nargs="+", metavar="NAME", help="only these (e.g. protonet+ft)")
    r.set_defaults(func=run)
    t = sub.add_parser("table")
    t.set_defaults(func=table)
    sub.add_parser("plot").set_defaults(func=plot)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
