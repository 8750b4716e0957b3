"""Meta-RL benchmark: every method on one task family, trained and tested with the shared trainer
and evaluator, returns after 0-3 adaptation steps (RL²: episodes 1-4 of a trial) on 600 fixed test
tasks, mean ± 95 % CI; Figure-4/5-shaped plot and (2-D navigation) trajectories.

    python benchmarks/rl_meta.py train maml-trpo                       # one method (resumable)
    python benchmarks/rl_meta.py train maml-trpo --resume              # continue from its last/
    python benchmarks/rl_meta.py report                                # table + PNGs of what exists
    python benchmarks/rl_meta.py paired rl2                            # paired differences, same tasks
    python benchmarks/rl_meta.py train maml-trpo --family cheetah-velocity --steps 60 --episodes 40

Runs live in benchmarks/results/rl/<family>/<method>/ (config, metrics.jsonl, last/ and best/
checkpoints: a few hundred kB for these policies); results in <method>.json beside them.
CPU times are of this process (one torch thread).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, facts_line  # noqa: E402
from metamap import config as configlib  # noqa: E402
from metamap.train.checkpoint import load_learner  # noqa: E402
from metamap.train.run import evaluate_checkpoint, train  # noqa: E402
from metamap.train.trainer import TrainingInterrupted  # noqa: E402

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


def stop_after_cpu(seconds: float) -> threading.Event:
    """SIGTERM this process once it has used ``seconds`` of CPU time (unless the returned event is
    set first): the trainer finishes the step in flight and writes last/, and the segment ends
    cleanly (continued with --resume)."""
    start, done = time.process_time(), threading.Event()

    def watch():
        while time.process_time() - start < seconds:
            if done.wait(2.0):
                return
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, daemon=True).start()
    return done


@contextlib.contextmanager
def per_task_scores():
    """The ``return_k -> [T]`` chunks the evaluator receives from the RL learners, in order.

    The evaluator keeps per-task scores of its first metric only; paired differences need every
    metric's, task by task, from the same rollouts: recorded here as the learners hand them over
    (checked against the evaluator's own list of the first metric)."""
    from metamap.rl.learners import PolicyGradientLearner, RL2Learner
    seen, originals = [], {cls: cls.score_tasks for cls in (PolicyGradientLearner, RL2Learner)}

    def recording(original):
        def score_tasks(self, tasks):
            out = original(self, tasks)
            seen.append({k: v.detach().cpu() for k, v in out.items()})
            return out
        return score_tasks
    for cls, original in originals.items():
        cls.score_tasks = recording(original)
    try:
        yield seen
    finally:
        for cls, original in originals.items():
            cls.score_tasks = original


def save_scores(path: Path, method: str, family: str, seed: int, scores: dict) -> None:
    tasks = len(next(iter(scores.values())))
    path.write_text(json.dumps({"method": method, "family": family, "tasks": tasks, "eval_seed": seed,
                                "per_task": {k: v.tolist() for k, v in scores.items()}}))


def paired(a, b) -> dict:
    from metamap.train.evaluate import confidence_interval
    d = b - a
    mean, ci, _ = confidence_interval(d)
    return {"mean": mean, "ci95": ci, "tasks_b_above_a": int((d > 0).sum()), "tasks": len(d)}


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
    watching = stop_after_cpu(args.cpu_budget * 60) if args.cpu_budget else threading.Event()
    try:
        summary = train(config, folder, resume=folder if args.resume else None, progress=not args.quiet,
                        run_test=False)
        stopped = False
    except TrainingInterrupted:       # the CPU budget of this segment: last/ holds the step reached
        summary = {"steps": json.loads((folder / "last" / "checkpoint.json").read_text())["step"]}
        stopped = True
    finally:
        watching.set()
    train_cpu, train_wall = time.process_time() - cpu0, time.perf_counter() - wall0
    spent = {"train_cpu_minutes": round(previous.get("train_cpu_minutes", 0.0) + train_cpu / 60, 2),
             "train_wall_minutes": round(previous.get("train_wall_minutes", 0.0) + train_wall / 60, 2),
             "steps": summary["steps"], "method": args.method, "family": args.family}
    if args.no_eval or stopped:       # a segment of a longer run: keep the time spent, test at the end
        (folder.parent / f"{args.method}.json").write_text(json.dumps(spent, indent=2))
        print(json.dumps(spent))
        return 0
    cpu1 = time.process_time()
    with per_task_scores() as seen:
        (result,) = evaluate_checkpoint(folder, progress=not args.quiet)  # best/ (= last/ without validation)
    eval_cpu = time.process_time() - cpu1
    scores = {k: torch.cat([c[k] for c in seen]).double() for k in seen[0]}
    if scores[result.metric].tolist() != list(result.scores):
        raise SystemExit("the per-task scores seen differ from the evaluator's; not saving them")
    save_scores(folder.parent / f"{args.method}-scores.json", args.method, args.family, result.seed, scores)
    log_file = folder / "metrics.jsonl"                  # absent when nothing was trained (random)
    log = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()] if log_file.exists() else []
    steps_s = [r["env_steps_per_s"] for r in log if "env_steps_per_s" in r]
    iteration_s = np.diff([0.0] + [r["elapsed_s"] for r in log if "elapsed_s" in r])
    returns = {result.metric: (result.mean, result.ci95), **{k: (v["mean"], v["ci95"]) for k, v in result.others.items()}}
    payload = {
        "command": "python benchmarks/rl_meta.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
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
    from metamap.report.rl import ci_table, plot_adaptation, plot_paths
    from metamap.rl.maml import adapted_paths
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
                out = plot_paths(adapted_paths(learner.meta, goals), goals, folder / f"paths-{method}.png",
                                 label=method)
                print(f"trajectories: {out}")
    return 0


def cmd_paired(args) -> int:
    """Paired differences over the same test tasks (mean ± 95 % CI): ``return_k - return_0`` and
    ``return_{k+1} - return_k`` of one method, and with ``--vs OTHER`` each ``return_k`` of the
    method minus OTHER's on the same tasks.

    The evaluator reports each metric's CI over tasks; the difference of two scores on the same
    tasks removes the spread between tasks (a goal far away costs every method alike) and is
    tighter. The per-task scores come from the method's test run (``<method>-scores.json``, all of
    ``return_0..3`` from the same rollouts); a run tested before those were kept is scored once
    more, exactly as ``metamap eval`` draws its tasks, and checked against its recorded means.
    """
    folder = run_dir(args.family, args.method)
    scores = load_scores(args.family, args.method)
    k = range(4)
    if args.vs:
        other = load_scores(args.family, args.vs)
        if args.vs_step is None:
            differences = {f"{args.method} - {args.vs}, return_{i}": paired(other[f"return_{i}"], scores[f"return_{i}"])
                           for i in k}
            name = f"{args.method}-vs-{args.vs}"
        else:     # every step of the method against one fixed step of the other (e.g. its policy as is)
            j = args.vs_step
            differences = {f"{args.method} return_{i} - {args.vs} return_{j}": paired(other[f"return_{j}"],
                                                                                      scores[f"return_{i}"])
                           for i in k}
            name = f"{args.method}-vs-{args.vs}-step{j}"
    else:
        pairs = [(f"return_{i}", "return_0") for i in k[1:]] + [(f"return_{i + 1}", f"return_{i}") for i in k[1:-1]]
        differences = {f"{b} - {a}": paired(scores[a], scores[b]) for b, a in pairs}
        name = args.method
    out = {"method": args.method, "family": args.family, "tasks": len(scores["return_0"]),
           "differences": differences,
           "command": "python benchmarks/rl_meta.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
    (folder.parent / f"{name}-paired.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return 0


def load_scores(family: str, method: str) -> dict:
    """Per-task ``return_k`` of a tested method (scored anew, once, if its test run did not keep them)."""
    from metamap.rl.tasks import RLSource
    folder = run_dir(family, method)
    path = folder.parent / f"{method}-scores.json"
    recorded = json.loads((folder.parent / f"{method}.json").read_text())
    if not path.exists():
        torch.set_num_threads(1)
        loaded = load_learner(folder)
        learner, config = getattr(loaded, "learner", loaded), loaded.config
        sampler = RLSource().sampler(config, "test", 1, 1, 1, 1, config["eval"]["seed"])   # as metamap eval
        episodes = config["eval"]["episodes"]
        chunks = [learner.score_tasks(sampler.episodes(range(s, min(s + 50, episodes))))
                  for s in range(0, episodes, 50)]
        fresh = {k: torch.cat([c[k] for c in chunks]).double() for k in chunks[0]}
        check = {k: abs(float(v.mean()) - recorded["test"][k][0]) for k, v in fresh.items()}
        if max(check.values()) > 1e-6:
            raise SystemExit(f"{method}: the re-scored means differ from the recorded test result: {check}")
        save_scores(path, method, family, config["eval"]["seed"], fresh)
    data = json.loads(path.read_text())
    if data["eval_seed"] != recorded["eval_seed"] or data["tasks"] != recorded["test_episodes"]:
        raise SystemExit(f"{path} is not of {method}'s recorded test run; delete it to score again")
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in data["per_task"].items()}


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
    t.add_argument("--cpu-budget", type=float, default=0.0, metavar="MINUTES",
                   help="end this segment cleanly (checkpoint, no test) after this much process CPU time")
    r = sub.add_parser("report")
    r.add_argument("--family", default="navigation2d")
    q = sub.add_parser("paired", help="paired differences of the returns on the same test tasks")
    q.add_argument("method", choices=METHODS)
    q.add_argument("--family", default="navigation2d")
    q.add_argument("--vs", choices=METHODS, help="another tested method: differences on the same tasks")
    q.add_argument("--vs-step", type=int, choices=range(4), metavar="K",
                   help="with --vs: compare every step of METHOD with the other's return after K steps")
    args = p.parse_args(argv)
    return {"train": cmd_train, "report": cmd_report, "paired": cmd_paired}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
