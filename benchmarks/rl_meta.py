"""Meta-RL benchmark: every method on one task family, trained and tested with the shared trainer
and evaluator, returns after 0-3 adaptation steps (RL²: episodes 1-4 of a trial) on 600 fixed test
tasks, mean ± 95 % CI; Figure-4/5-shaped plot and (2-D navigation) trajectories.

    python benchmarks/rl_meta.py train maml-trpo                       # one method (resumable)
    python benchmarks/rl_meta.py train maml-trpo --resume              # continue from its last/
    python benchmarks/rl_meta.py report                                # table + PNGs of what exists
    python benchmarks/rl_meta.py train maml-trpo --family cheetah-velocity --steps 60 --episodes 40

Runs live in benchmarks/results/rl/<family>/<method>/ (config, metrics.jsonl, last/ and best/
checkpoints: a few hundred kB for these policies); results in <method>.json beside them.
CPU times are of this process (one torch thread).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, facts_line  # noqa: E402
from metamap import config as configlib  # noqa: E402
from metamap.train.checkpoint import load_learner  # noqa: E402
from metamap.train.run import evaluate_checkpoint, train  # noqa: E402

METHODS = ["maml-trpo", "fomaml-trpo", "maml-promp", "pretrained", "random", "oracle", "rl2"]

# Approximate values read off Finn et al. (2017), Figure 4 (top, 2-D navigation, log-scaled return axis)
# and Figure 5 (half-cheetah goal velocity and direction): after 0, 1, 2, 3 gradient steps. Read
# by eye from the published figure, to perhaps +-15 %; the paper gives no table.
PAPER = {
    "navigation2d": {"maml-trpo": [-40, -12, -9, -8], "pretrained": [-40, -38, -37, -36],
                     "random": [-95, -85, -80, -75], "oracle": [-5]},
    "cheetah-velocity": {"maml-trpo": [-130, -75, -65, -60], "pretrained": [-155, -135, -130, -128],
                         "random": [-160, -160, -158, -157], "oracle": [-60]},
    "cheetah-direction": {"maml-trpo": [0, 300, 310, 320], "pretrained": [0, 20, 40, 50],
                          "random": [0, 0, 5, 10], "oracle": [400]},
}


def run_dir(family: str, method: str) -> Path:
    return RESULTS / "rl" / family / method


def overrides(args) -> list[str]:
    out = [f"learner.name='{args.method}'", f"data.name='{args.family}'", "train.threads=1",
           f"eval.episodes={args.episodes}", "train.checkpoint_every=5"]
    if args.steps is not None:
        out.append(f"train.steps={args.steps}")
    return out + list(args.set)


def cmd_train(args) -> int:
    folder = run_dir(args.family, args.method)
    base = None
    if args.resume:
        base = json.loads((folder / "last" / "checkpoint.json").read_text())["config"]
    config = configlib.resolve(overrides=overrides(args), base=base)
    if not args.resume and (folder / "last").exists():
        raise SystemExit(f"{folder} holds a run; continue it with --resume or delete it")
    previous = json.loads((folder.parent / f"{args.method}.json").read_text()) if args.resume and (
        folder.parent / f"{args.method}.json").exists() else {}
    print(facts_line(), flush=True)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    summary = train(config, folder, resume=folder if args.resume else None, progress=not args.quiet,
                    run_test=False)
    train_cpu, train_wall = time.process_time() - cpu0, time.perf_counter() - wall0
    spent = {"train_cpu_minutes": round(previous.get("train_cpu_minutes", 0.0) + train_cpu / 60, 2),
             "train_wall_minutes": round(previous.get("train_wall_minutes", 0.0) + train_wall / 60, 2),
             "steps": summary["steps"], "method": args.method, "family": args.family}
    if args.no_eval:                  # a segment of a longer run: keep the time spent, test at the end
        (folder.parent / f"{args.method}.json").write_text(json.dumps(spent, indent=2))
        print(json.dumps(spent))
        return 0
    cpu1 = time.process_time()
    (result,) = evaluate_checkpoint(folder, progress=not args.quiet)      # best/ (= last/ without validation)
    eval_cpu = time.process_time() - cpu1
    log_file = folder / "metrics.jsonl"                  # absent when nothing was trained (random)
    log = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()] if log_file.exists() else []
    steps_s = [r["env_steps_per_s"] for r in log if "env_steps_per_s" in r]
    iteration_s = np.diff([0.0] + [r["elapsed_s"] for r in log if "elapsed_s" in r])
    returns = {result.metric: (result.mean, result.ci95), **{k: (v["mean"], v["ci95"]) for k, v in result.others.items()}}
    payload = {
        "command": "python benchmarks/rl_meta.py " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
        **spent, "eval_cpu_minutes": round(eval_cpu / 60, 2),
        "median_iteration_wall_s": float(np.median(iteration_s)) if len(iteration_s) else None,
        "median_env_steps_per_s": float(np.median(steps_s)) if steps_s else None,
        "test": {k: list(returns[k]) for k in sorted(returns)}, "test_setting": result.setting,
        "test_episodes": result.episodes, "eval_seed": result.seed, "config": config,
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": facts_line(),
    }
    (folder.parent / f"{args.method}.json").write_text(json.dumps(payload, indent=2))
    print(json.dumps({k: payload[k] for k in ("method", "steps", "train_cpu_minutes", "eval_cpu_minutes", "test")},
                     indent=1))
    return 0


def cmd_report(args) -> int:
    from metamap.rl.plots import ci_table, plot_adaptation, plot_navigation
    folder = RESULTS / "rl" / args.family
    results = {}
    for method in METHODS:
        path = folder / f"{method}.json"
        if path.exists():
            test = json.loads(path.read_text())["test"]
            points = [tuple(test[f"return_{k}"]) for k in range(4)]
            results[method] = points[:1] if method == "oracle" else points
    if not results:
        raise SystemExit(f"no results under {folder}; run `train` first")
    title = {"navigation2d": "point robot, 2-D navigation", "cheetah-velocity": "half-cheetah, goal velocity",
             "cheetah-direction": "half-cheetah, forward/backward"}[args.family]
    png = plot_adaptation(results, folder / "returns.png", title, paper=PAPER.get(args.family))
    print(ci_table(results, "k"))
    print()
    print("| method | iterations | train CPU-min | wall s / iteration | env steps/s (sampling) | paper (0/1/2/3 steps) |")
    print("|---|---|---|---|---|---|")
    for method in results:
        d = json.loads((folder / f"{method}.json").read_text())
        paper = PAPER.get(args.family, {}).get(method)
        it = d.get("median_iteration_wall_s")
        sps = d.get("median_env_steps_per_s")
        print(f"| {method} | {d['steps']} | {d['train_cpu_minutes']:.1f} | {'' if it is None else f'{it:.1f}'} | "
              f"{'' if sps is None else f'{sps:,.0f}'} | {'' if paper is None else ' / '.join(map(str, paper))} |")
    print(f"plot: {png}")
    if args.family == "navigation2d":
        goals = np.array([[0.3, 0.35], [-0.4, 0.1], [0.1, -0.45], [-0.25, -0.3]])
        for method in ("maml-trpo", "pretrained"):
            if (run_dir(args.family, method) / "best").exists():
                learner = load_learner(run_dir(args.family, method)).learner
                out = plot_navigation(learner.meta, goals, folder / f"paths-{method}.png", label=method)
                print(f"trajectories: {out}")
    return 0


def cmd_paired(args) -> int:
    """Paired difference ``return_b - return_a`` over the same test tasks (mean ± 95 % CI): the
    evaluator reports each metric's CI over tasks; their difference on the same tasks is tighter."""
    import torch

    from metamap.rl.tasks import RLSource
    from metamap.train.evaluate import confidence_interval
    folder = run_dir(args.family, args.method)
    loaded = load_learner(folder)
    learner, config = loaded.learner, loaded.config
    sampler = RLSource().sampler(config, "test", 1, 1, 1, 1, config["eval"]["seed"])   # as metamap eval
    episodes = config["eval"]["episodes"]
    diffs = []
    for start in range(0, episodes, 50):
        scores = learner.score_tasks(sampler.episodes(range(start, min(start + 50, episodes))))
        diffs.append(scores[args.b] - scores[args.a])
    mean, ci, _ = confidence_interval(torch.cat(diffs))
    out = {"method": args.method, "difference": f"{args.b} - {args.a}", "mean": mean, "ci95": ci,
           "tasks": episodes}
    (folder.parent / f"{args.method}-paired-{args.b}-{args.a}.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("method", choices=METHODS)
    t.add_argument("--family", default="navigation2d")
    t.add_argument("--steps", type=int, help="meta-iterations (default: the learner's)")
    t.add_argument("--episodes", type=int, default=600, help="fixed test tasks")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--quiet", action="store_true")
    t.add_argument("--no-eval", action="store_true", help="train only (a segment of a run continued later)")
    r = sub.add_parser("report")
    r.add_argument("--family", default="navigation2d")
    q = sub.add_parser("paired", help="paired difference of two metrics on the same test tasks")
    q.add_argument("method", choices=METHODS)
    q.add_argument("--family", default="navigation2d")
    q.add_argument("--a", default="return_0")
    q.add_argument("--b", default="return_1")
    args = p.parse_args(argv)
    return {"train": cmd_train, "report": cmd_report, "paired": cmd_paired}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
