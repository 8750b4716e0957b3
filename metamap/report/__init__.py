"""Reports of runs: learning curves, a figure of test tasks, an HTML page; and comparisons.

``metamap report RUN_DIR`` regenerates everything from the run folder (config, metrics log,
results and best checkpoint); ``metamap compare RUN_DIR...`` draws several runs on one plot
and one table. The figure of test tasks depends on the task kind (:data:`TEST_FIGURES`): a
grid of episodes for image classification, true and predicted functions for regression.
This package draws; it is handed the learner and reads the run folder, so the training code
may call it and it never calls the training code.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import torch

from metamap.errors import MetamapError
from metamap.registry import data_source
from metamap.report.curves import plot_curves, read_metrics, validation_key
from metamap.report.regression import regression_tasks


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def read_results(run_dir: Path) -> dict:
    path = run_dir / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}


def episode_grid(learner, spec, config: dict, out: Path, episodes: int = 2, ways: int = 5,
                 queries: int = 2) -> Path | None:
    """A few test episodes: the support images, then queries titled predicted / true class."""
    if spec is None:
        return None
    source = data_source(config)
    test = source.dataset(config, "test")
    ways = min(ways, test.num_classes)
    sampler = source.sampler(config, "test", ways, 1, queries, 1, config["eval"]["seed"])
    tasks = sampler.episodes(range(episodes))
    with torch.set_grad_enabled(learner.adapts_with_gradients):
        predicted = learner.adapt(tasks.support_x, tasks.support_y, ways)(tasks.query_x).argmax(-1)
    mean, std = torch.tensor(spec.mean).view(-1, 1, 1), torch.tensor(spec.std).view(-1, 1, 1)
    show = lambda x: (x * std + mean).clamp(0, 1).permute(1, 2, 0).squeeze(-1).numpy()
    plt = _plt()
    cols = ways * max(1, queries)
    fig, axes = plt.subplots(2 * episodes, cols, figsize=(cols * 1.1, episodes * 2.6), squeeze=False)
    for e in range(episodes):
        for c in range(cols):
            for ax in (axes[2 * e][c], axes[2 * e + 1][c]):
                ax.axis("off")
        for j in range(ways):
            ax = axes[2 * e][j]
            ax.imshow(show(tasks.support_x[e, j]), cmap="gray")
            ax.set_title(f"class {j}", fontsize=7)
        for q in range(tasks.query_x.shape[1]):
            ax = axes[2 * e + 1][q]
            ax.imshow(show(tasks.query_x[e, q]), cmap="gray")
            p, t = int(predicted[e, q]), int(tasks.query_y[e, q])
            ax.set_title(f"pred {p} / true {t}", fontsize=7, color="green" if p == t else "red")
        axes[2 * e][0].text(-0.3, 0.5, f"episode {e}\nsupport", transform=axes[2 * e][0].transAxes,
                            ha="right", va="center", fontsize=8)
        axes[2 * e + 1][0].text(-0.3, 0.5, "queries", transform=axes[2 * e + 1][0].transAxes, ha="right",
                                va="center", fontsize=8)
    fig.suptitle(f"{test.description}: {ways}-way 1-shot test episodes", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
 body {{ font-family: sans-serif; margin: 2em; max-width: 1100px; }}
 table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: left; }}
 pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; }} img {{ max-width: 100%; }}
 #broken {{ color: #b00; font-weight: bold; }}
</style></head>
<body data-images-expected="{n_images}">
<h1>{title}</h1>
<p id="broken" hidden></p>
<h2>Test results</h2>
{results}
<h2>Learning curves</h2>
{curves}
<h2>Test episodes</h2>
{episodes}
<h2>Configuration</h2>
<pre>{config}</pre>
<script>
 // Say so on the page if a figure is missing, instead of leaving an empty frame.
 window.addEventListener("load", () => {{
   const imgs = [...document.images];
   const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0));
   document.body.dataset.imagesLoaded = imgs.length - broken.length;
   if (broken.length) {{
     const p = document.getElementById("broken");
     p.hidden = false;
     p.textContent = broken.length + " figure(s) failed to load: " + broken.map(i => i.getAttribute("src")).join(", ");
   }}
 }});
</script>
</body></html>
"""


def results_table(summary: dict) -> str:
    rows = summary.get("test", [])
    if not rows:
        return "<p>No test results (the run was trained with --no-test or has not finished).</p>"
    def value(r):
        if r.get("percent", r["metric"] == "accuracy"):      # results written before task kinds lack it
            return f"{100 * r['mean']:.2f}% ± {100 * r['ci95']:.2f}%"
        return f"{r['mean']:.4f} ± {r['ci95']:.4f} {r['metric']}"
    body = "".join(f"<tr><td>{html.escape(r['setting'])}</td><td>{value(r)}</td><td>{r['episodes']}</td>"
                   f"<td>{r['seed']}</td></tr>" for r in rows)
    best = summary.get("best") or {}
    return ("<table><tr><th>setting</th><th>mean ± 95% CI</th><th>episodes</th><th>seed</th></tr>"
            f"{body}</table><p>Best checkpoint: step {best.get('step')}; training time "
            f"{summary.get('train_seconds', 0) / 60:.1f} min.</p>")


def regression_figure(learner, spec, config: dict, out: Path) -> Path:
    """Four test tasks of a regression run (:func:`~metamap.report.regression.regression_tasks`)."""
    sampler = data_source(config).sampler(config, "test", 0, config["episode"]["shots"], 100, 1,
                                          config["eval"]["seed"])
    return regression_tasks(learner, sampler, out)


# Task kind -> figure of a few test tasks, ``(learner, spec, config, out) -> path or None``.
TEST_FIGURES = {"classification": episode_grid, "regression": regression_figure}
__all__ = ["compare", "plot_curves", "read_metrics", "write_report"]


def check_run_dir(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        raise MetamapError(f"{run_dir} is not a run folder (no metrics.jsonl); give a folder made by metamap train")
    return run_dir


def write_report(run_dir: str | Path, learner=None, spec=None, config: dict | None = None) -> Path:
    """(Re)generate ``curves.png``, the test-task figure (``episodes.png``, with a trained
    ``learner``, its preprocessing ``spec`` and its ``config``) and ``report.html`` in ``run_dir``."""
    run_dir = check_run_dir(run_dir)
    curves = plot_curves(run_dir)
    figure = None if learner is None or learner.kind is None else TEST_FIGURES.get(learner.kind.name)
    grid = figure(learner, spec, config, run_dir / "episodes.png") if figure else None
    config_text = (run_dir / "config.toml").read_text() if (run_dir / "config.toml").exists() else ""
    images = [p for p in (curves, grid) if p]
    page = PAGE.format(
        title=html.escape(f"metamap run {run_dir.name}"), n_images=len(images),
        results=results_table(read_results(run_dir)),
        curves=f'<img src="{curves.name}" alt="learning curves">' if curves else "<p>No steps logged.</p>",
        episodes=f'<img src="{grid.name}" alt="test tasks">' if grid else "<p>No figure of test tasks.</p>",
        config=html.escape(config_text))
    out = run_dir / "report.html"
    out.write_text(page)
    return out


def compare(run_dirs: list[str | Path], out: str | Path) -> tuple[Path, str]:
    """Validation (or training) curves of several runs on one plot, and a Markdown table of their results."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    lines = ["| run | learner | setting | test (95% CI) | training time |", "|---|---|---|---|---|"]
    for d in map(Path, run_dirs):
        rows = read_metrics(d)
        if not rows:
            raise MetamapError(f"{d} has no metrics.jsonl; give run folders made by metamap train")
        key = validation_key(rows)
        val = [r for r in rows if key and key in r]
        if val:
            ax.plot([r["step"] for r in val], [r[key] for r in val], marker="o", label=d.name)
        else:
            train = [r for r in rows if "loss" in r]
            ax.plot([r["step"] for r in train], [r["loss"] for r in train], label=f"{d.name} (training loss)")
        summary = read_results(d)
        learner = json.loads((d / "last" / "checkpoint.json").read_text()).get("learner", "?") \
            if (d / "last" / "checkpoint.json").exists() else "?"
        for r in summary.get("test", []) or [{}]:
            value = (f"{100 * r['mean']:.2f} ± {100 * r['ci95']:.2f} %"
                     if r and r.get("percent", r.get("metric") == "accuracy")
                     else f"{r['mean']:.4f} ± {r['ci95']:.4f} {r['metric']}" if r else "-")
            lines.append(f"| {d.name} | {learner} | {r.get('setting', '-')} | {value} | "
                         f"{summary.get('train_seconds', 0) / 60:.1f} min |")
    ax.set(xlabel="meta-training batch", ylabel="validation score", title="runs compared")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out, "\n".join(lines)
