"""Cross-domain few-shot benchmark: Omniglot-trained checkpoints scored on shifted domains.

    python benchmarks/domain_shift.py run --checkpoints protonet=runs/src-protonet maml=runs/src-maml \
        finetune=runs/src-finetune --episodes 600 --threads 1
    python benchmarks/domain_shift.py table            # the Markdown table of what was measured so far

Every cell is ``metamap eval --checkpoint C --data TARGET`` (the one evaluator, 5-way, 15 queries
per class, fixed episodes of the target's test classes, mean ± 95% CI); "protonet+ft" is the
ProtoNet checkpoint with automatic test-time fine-tuning (``eval.finetune=true``: learning rate and
steps chosen on 5 episodes of the target's validation classes). Results are appended to
benchmarks/results/domain_shift.json cell by cell, so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
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
FT = ["eval.finetune=true", "eval.finetune_steps_grid=[5, 10, 20]"]
OUT = RESULTS / "domain_shift.json"


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


def run(args) -> None:
    import torch

    from metamap.train.run import evaluate_checkpoint
    torch.set_num_threads(args.threads)
    print(facts_line(), flush=True)
    learners = dict(kv.split("=", 1) for kv in args.checkpoints)
    if "protonet" in learners and not args.no_ft:
        learners["protonet+ft"] = learners["protonet"]
    done = {(r["learner"], r["target"], r["shots"]) for r in load()}
    for name, target, shots in cells(learners, args.targets, args.shots):
        if (name, target, shots) in done:
            continue
        queries = 5 if shots == 15 else 15
        overrides = [*TARGETS[target], "eval.ways=[5]", f"eval.shots=[{shots}]", f"eval.queries={queries}",
                     f"eval.episodes={args.episodes}", f"train.threads={args.threads}"]
        if name.endswith("+ft"):
            overrides += FT
        t0, c0 = time.perf_counter(), time.process_time()
        result = evaluate_checkpoint(learners[name], overrides, progress=False, echo=lambda *_: None)[0]
        row = {"learner": name, "target": target, "shots": shots, "queries": queries,
               "checkpoint": learners[name], "overrides": overrides, "mean": result.mean, "ci95": result.ci95,
               "episodes": result.episodes, "seed": result.seed, "finetune": result.finetune,
               "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
               "command": "metamap eval --checkpoint " + learners[name] + " " +
                          " ".join(f"--set {o}" for o in overrides)}
        rows = load()
        rows.append(row)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(rows, indent=1))
        tuned = f" (lr {result.finetune['lr']:g}, {result.finetune['steps']} steps)" if result.finetune else ""
        print(f"{name:12s} {target:16s} {shots:2d}-shot: {100 * result.mean:.2f} ± {100 * result.ci95:.2f} %"
              f"{tuned}  [{row['cpu_s']:.0f} CPU s]", flush=True)


def table(args) -> None:
    rows = load()
    learners = list(dict.fromkeys(r["learner"] for r in rows))
    targets = list(dict.fromkeys(r["target"] for r in rows))
    print("| target | shots | " + " | ".join(learners) + " |")
    print("|---|---:|" + "---:|" * len(learners))
    for target in targets:
        for shots in SHOTS[target]:
            got = {r["learner"]: r for r in rows if r["target"] == target and r["shots"] == shots}
            if not got:
                continue
            def cell(name):
                r = got.get(name)
                if r is None:
                    return "—"
                extra = f" (lr {r['finetune']['lr']:g}, {r['finetune']['steps']} st.)" if r.get("finetune") else ""
                return f"{100 * r['mean']:.2f} ± {100 * r['ci95']:.2f}{extra}"
            print(f"| {target} | {shots} | " + " | ".join(cell(n) for n in learners) + " |")


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
    r.set_defaults(func=run)
    t = sub.add_parser("table")
    t.set_defaults(func=table)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
