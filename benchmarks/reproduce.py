"""Reproduce a paper's figure under a CPU-time budget: train a configs/reproduce/ config, test it.

    python benchmarks/reproduce.py configs/reproduce/protonet-omniglot-1shot.toml --budget 60
    python benchmarks/reproduce.py configs/reproduce/protonet-omniglot-1shot.toml --resume
    python benchmarks/reproduce.py --table          # every finished (and unfinished) run

Meta-training runs on one thread (``--threads``) so that two runs can share this 2-core CPU,
and stops when the *process CPU time spent in training steps* reaches ``--budget`` minutes (or
at ``train.steps``, the horizon of the config's schedule, whichever comes first). Validation
(``train.val_every``, ``train.val_episodes``) is timed apart and does not count against the
budget. The best validation checkpoint is then tested on ``eval.episodes`` fixed episodes of
every ``eval.ways x eval.shots`` setting (mean ± 95 % CI).

Everything lives in ``benchmarks/results/reproduce/`` (``--results`` for another folder):
``NAME/`` is the run folder (``last/`` and ``best/`` checkpoints -- small safetensors + JSON --
and ``metrics.jsonl``), ``NAME.json`` the result (config, learning curve of validation accuracy
against training CPU-minutes and images seen, test results, CPU costs, machine) and ``NAME.png``
the learning curve. A run stopped by SIGINT/SIGTERM, or by the end of a session, continues from
``NAME/last`` with ``--resume``: its CPU time, curve and best checkpoint carry over.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, facts_line, mann_presentations

from metamap import config as configlib
from metamap.train.runtime import machine_facts

DEFAULT_RESULTS = RESULTS / "reproduce"


def images_per_batch(config: dict) -> int:
    e = config["episode"]
    return e["tasks_per_batch"] * e["ways"] * (e["shots"] + e["queries"])


class BudgetRun:
    """One reproduce run: the shared trainer driven step by step until the CPU budget is spent."""

    def __init__(self, config: dict, run_dir: Path, budget_minutes: float, resume: bool, echo=print):
        from metamap.train.run import build, info_to_dict, make_validation, memory_format_for, setup_runtime
        from metamap.train.trainer import Trainer

        self.config, self.run_dir, self.budget_s, self.echo = config, run_dir, 60 * budget_minutes, echo
        self.device = setup_runtime(config)
        self.source, info, self.learner = build(config)
        self.memory_format = memory_format_for(config, info)
        if self.memory_format is not None:
            self.learner.to(memory_format=self.memory_format)
        ep = config["episode"]
        sampler = self.source.sampler(config, "train", ep["ways"], ep["shots"], ep["queries"],
                                      ep["tasks_per_batch"], config["seed"])
        validate = make_validation(self.learner, config, self.source, self.device, self.memory_format)
        if validate is None:
            raise SystemExit("reproduce: this config has no validation (train.val_every = 0 or no val split); "
                             "the best checkpoint needs one")
        meta = {"learner": config["learner"]["name"], "config": config, "data_info": info_to_dict(info)}
        self.trainer = Trainer(self.learner, sampler, config, run_dir, meta, validate=validate,
                               device=self.device, memory_format=self.memory_format, progress=False)
        self.state = {"train_cpu_s": 0.0, "val_cpu_s": 0.0, "curve": [], "stopped": None}
        if resume:
            self.trainer.resume(run_dir / "last")
            from metamap.train import checkpoint
            self.state = checkpoint.read_meta(run_dir / "last")[1]["reproduce"]
        self.images = images_per_batch(config)
        self._signal: int | None = None

    def _save_last(self) -> None:
        self.trainer.meta["reproduce"] = self.state
        self.trainer.save("last")

    def _validate(self) -> None:
        t0 = time.process_time()
        result = self.trainer.run_validation()
        self.state["val_cpu_s"] += time.process_time() - t0
        point = {"step": self.trainer.step, "cpu_minutes": round(self.state["train_cpu_s"] / 60, 3),
                 "images": self.trainer.step * self.images, "val_accuracy": result.mean, "val_ci95": result.ci95,
                 "val_setting": result.setting}
        self.state["curve"].append(point)
        self.echo(f"step {point['step']:6d}  {point['cpu_minutes']:6.2f} CPU-min  val {100 * result.mean:.2f} "
                  f"± {100 * result.ci95:.2f} %{'  (best)' if self.trainer.best['step'] == point['step'] else ''}",
                  flush=True)

    def fit(self) -> bool:
        """Train until the budget or the step horizon; ``True`` if finished, ``False`` if interrupted."""
        steps, every = self.config["train"]["steps"], self.config["train"]["val_every"]
        log_every = self.config["train"]["log_every"]
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            if self.trainer.step == 0 and not self.state["curve"]:
                self._validate()                      # the untrained network: the curve's origin
            while self.trainer.step < steps and self.state["train_cpu_s"] < self.budget_s:
                t0 = time.process_time()
                record = self.trainer.train_step()
                self.state["train_cpu_s"] += time.process_time() - t0
                if record is not None and self.trainer.step % log_every == 0:
                    self.trainer.log({**record, "train_cpu_s": round(self.state["train_cpu_s"], 2)})
                if self.trainer.step % every == 0:
                    self._validate()
                    self._save_last()
                if self._signal is not None:
                    self._save_last()
                    self.echo(f"stopped by signal {signal.Signals(self._signal).name} at step {self.trainer.step}; "
                              "continue with --resume", flush=True)
                    return False
            if not self.state["curve"] or self.state["curve"][-1]["step"] != self.trainer.step:
                self._validate()
            self.state["stopped"] = "budget" if self.state["train_cpu_s"] >= self.budget_s else "steps"
            self._save_last()
            return True
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _on_signal(self, signum, frame) -> None:
        if self._signal is not None:
            raise KeyboardInterrupt
        self._signal = signum

    def test(self, overrides: list[str] = ()) -> tuple[list, float, int]:
        """Test the best checkpoint; ``overrides`` (``learner.KEY=VALUE``) rebuild the learner
        with other adaptation settings around the same weights."""
        from metamap.train import checkpoint
        from metamap.train.run import build, test, test_samplers
        best = checkpoint.resolve_path(self.run_dir / "best")
        path, meta = checkpoint.read_meta(best)
        config, learner = self.config, self.learner
        if overrides:
            config = configlib.resolve(overrides=list(overrides), base=self.config)
            learner = build(config)[2]
            if self.memory_format is not None:
                learner.to(memory_format=self.memory_format)
        checkpoint.load_state(learner, checkpoint.read_tensors(path, checkpoint.WEIGHTS, meta), path)
        t0 = time.process_time()
        results = test(learner, config, test_samplers(config, self.source), self.device,
                       self.memory_format, progress=sys.stderr.isatty())
        return results, time.process_time() - t0, meta["step"]


def presentations(learner, config: dict, episodes: int, seed: int) -> dict[str, list[float]]:
    """MANN's accuracy by presentation (:func:`common.mann_presentations`) as ``{"k": [mean, ci95]}`` in percent."""
    return {str(k): [round(100 * m, 2), round(100 * c, 2)]
            for k, (m, c) in mann_presentations(learner, config, episodes, seed).items()}


def add_presentations(results_dir: Path, name: str) -> dict:
    """Score a finished MANN run's best checkpoint by presentation and record it in ``NAME.json``."""
    from metamap.train import checkpoint
    path = results_dir / f"{name}.json"
    result = json.loads(path.read_text())
    loaded = checkpoint.load_learner(results_dir / name / "best")
    learner, config = getattr(loaded, "learner", loaded), loaded.config
    if not hasattr(learner, "sequence_outputs"):
        raise SystemExit(f"{name} is a {config['learner']['name']} run; presentations are MANN's figures")
    result["presentations"] = presentations(learner, config, config["eval"]["episodes"], config["eval"]["seed"])
    path.write_text(json.dumps(result, indent=2))
    return result["presentations"]


def plot(result: dict, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = result["curve"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    x = [p["cpu_minutes"] for p in curve]
    y = [100 * p["val_accuracy"] for p in curve]
    ci = [100 * p["val_ci95"] for p in curve]
    ax.plot(x, y, marker="o", ms=3, lw=1.2, label=result["val_setting"])
    ax.fill_between(x, [a - c for a, c in zip(y, ci)], [a + c for a, c in zip(y, ci)], alpha=0.2)
    for r in result.get("test", []):
        ax.axhline(100 * r["mean"], ls=":", lw=1, color="grey")
        ax.annotate(f"test {r['setting'].split(',')[0]}: {100 * r['mean']:.2f} %", (x[-1], 100 * r["mean"]),
                    ha="right", va="bottom", fontsize=8)
    for label, value in (result.get("targets") or {}).items():
        ax.axhline(value, ls="--", lw=0.8, color="tab:red")
        ax.annotate(f"paper {label}: {value}", (0, value), ha="left", va="bottom", fontsize=8, color="tab:red")
    lo = min(y[1:] or y)
    ax.set_ylim(max(0, min(lo, *(100 * r["mean"] for r in result.get("test", [])) or [lo]) - 3), 100)
    ax.set(xlabel="training CPU-minutes (1 thread)", ylabel="accuracy (%)", title=result["name"])
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def curve_of(results_dir: Path, name: str) -> list[dict]:
    """A run's validation curve: from NAME.json when it finished, else from its last/ checkpoint."""
    done = results_dir / f"{name}.json"
    if done.is_file():
        return json.loads(done.read_text())["curve"]
    from metamap.train import checkpoint
    return checkpoint.read_meta(results_dir / name / "last")[1]["reproduce"]["curve"]


def compare(results_dir: Path, names: list[str], out: Path) -> Path:
    """Validation accuracy of several runs against the number of training images seen (equal work for
    metric learners whose episodes differ in size), and against CPU-minutes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for name in names:
        curve = curve_of(results_dir, name)[1:]
        for ax, key in zip(axes, ("images", "cpu_minutes")):
            ax.plot([p[key] for p in curve], [100 * p["val_accuracy"] for p in curve], marker="o", ms=3, label=name)
    axes[0].set(xlabel="training images seen", ylabel="validation accuracy (%)", xscale="log")
    axes[1].set(xlabel="training CPU-minutes (1 thread)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def row(result: dict) -> list[str]:
    tests = {r["setting"].split(",")[0]: r for r in result.get("test", [])}
    cells = [f"{100 * r['mean']:.2f} ± {100 * r['ci95']:.2f}" for r in tests.values()]
    state = "" if result.get("finished") else " (unfinished)"
    return [result["name"] + state, ", ".join(tests) or "-", " / ".join(cells) or "-",
            f"{result['train_cpu_minutes']:.1f}", str(result["steps"]), f"{result['images_seen']:,}",
            str(result.get("best_step", "-"))]


def table(results_dir: Path) -> str:
    lines = ["| run | settings | test accuracy (%) | training CPU-min | meta-batches | images seen | best step |",
             "|---|---|---|---:|---:|---:|---:|"]
    for path in sorted(results_dir.glob("*.json")):
        lines.append("| " + " | ".join(row(json.loads(path.read_text()))) + " |")
    return "\n".join(lines)


def targets_of(config_path: Path) -> dict:
    """``# target: 5-way 1-shot = 98.8`` comment lines of a config: the paper's figures."""
    out = {}
    for line in config_path.read_text().splitlines():
        if line.startswith("# target:") and "=" in line:
            label, value = line[len("# target:"):].split("=", 1)
            out[label.strip()] = float(value.split()[0])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?")
    p.add_argument("--name", help="run name (default: the config's file name without .toml)")
    p.add_argument("--budget", type=float, default=60.0, help="training CPU-minutes (default 60)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", action="store_true", help="continue NAME/last (same config, same budget unless given)")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--table", action="store_true", help="print the table of all results and exit")
    p.add_argument("--compare", nargs="+", metavar="NAME",
                   help="plot these runs' validation curves against images seen and CPU-minutes and exit")
    p.add_argument("--presentations", metavar="NAME",
                   help="score a finished MANN run's best checkpoint by presentation (1st..10th), record it, exit")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                   help="also test the best checkpoint with these learner overrides (adaptation only), "
                        "e.g. non-transductive:learner.transductive=false")
    args = p.parse_args()
    if args.table:
        print(table(args.results))
        return
    if args.presentations:
        print(json.dumps(add_presentations(args.results, args.presentations)))
        return
    if args.compare:
        print(compare(args.results, args.compare, args.results / ("compare-" + "-".join(args.compare) + ".png")))
        return
    if not args.config:
        p.error("a config is needed (or --table)")
    config_path = Path(args.config)
    name = args.name or config_path.stem
    run_dir = args.results / name
    from metamap.errors import MetamapError
    from metamap.train.run import hold_run_dir, open_run_dir
    try:   # the CLI's own checks: a new run needs an empty folder, a resumed one its checkpoint
        open_run_dir(run_dir, args.resume)
        held = contextlib.ExitStack()
        held.enter_context(hold_run_dir(run_dir))      # creates the folder; one writer at a time
    except MetamapError as e:
        p.error(str(e))
    base = None
    if args.resume:
        from metamap.train import checkpoint
        base = checkpoint.read_meta(run_dir / "last")[1]["config"]
    cfg = configlib.resolve(None if args.resume else config_path, [*args.overrides, f"train.threads={args.threads}"],
                            base=base)
    run = BudgetRun(cfg, run_dir, args.budget, args.resume)
    print(facts_line(), flush=True)              # after BudgetRun set the thread count
    print(f"reproduce {name}: {cfg['learner']['name']} on {run.source.dataset(cfg, 'train').description}, "
          f"{run.trainer.sampler.describe()}, {cfg['episode']['tasks_per_batch']} task(s)/batch, "
          f"budget {args.budget:g} training CPU-minutes or {cfg['train']['steps']} batches -> {run_dir}", flush=True)
    if not run.fit():
        sys.exit(1)
    results, test_cpu, best_step = run.test()
    variants = {}
    for spec in args.variant:
        label, _, sets = spec.partition(":")
        extra, cpu, _ = run.test(sets.split(","))
        variants[label] = {"overrides": sets.split(","), "test": [r.to_dict() for r in extra],
                           "test_cpu_minutes": round(cpu / 60, 2)}
        for r in extra:
            print(f"  [{label}] {r.summary()}", flush=True)
    s = run.state
    result = {
        "name": name, "config_file": str(config_path), "command": " ".join(["python", *sys.argv]),
        "finished": True, "stopped": s["stopped"], "budget_cpu_minutes": args.budget,
        "train_cpu_minutes": round(s["train_cpu_s"] / 60, 2), "val_cpu_minutes": round(s["val_cpu_s"] / 60, 2),
        "test_cpu_minutes": round(test_cpu / 60, 2), "steps": run.trainer.step,
        "images_per_batch": run.images, "images_seen": run.trainer.step * run.images, "best_step": best_step,
        "val_setting": f"{s['curve'][-1]['val_setting']}, {cfg['train']['val_episodes']} episodes",
        "curve": s["curve"], "test": [r.to_dict() for r in results], "variants": variants,
        "targets": targets_of(config_path),
        "threads": args.threads, "machine": machine_facts(), "date": time.strftime("%Y-%m-%d %H:%M"),
        "config": cfg,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    if hasattr(run.learner, "sequence_outputs"):          # MANN: its paper's figures are per presentation
        result["presentations"] = presentations(run.learner, cfg, cfg["eval"]["episodes"], cfg["eval"]["seed"])
        print(f"  accuracy by presentation (%): {result['presentations']}", flush=True)
    (args.results / f"{name}.json").write_text(json.dumps(result, indent=2))
    plot(result, args.results / f"{name}.png")
    for r in results:
        print(f"  {r.summary()}", flush=True)
    print(table(args.results))


if __name__ == "__main__":
    main()
