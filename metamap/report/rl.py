"""Pictures and tables of meta-RL results: return against adaptation steps (the shape of Finn et
al.'s Figures 4 and 5), and 2-D navigation paths before and after adaptation. Drawing only: the
paths are computed by :func:`metamap.rl.maml.adapted_paths`."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_adaptation(results: dict[str, list[tuple[float, float]]], path: str | Path, title: str,
                    xlabel: str = "number of gradient steps (episodes of experience for RL²)",
                    paper: dict[str, list[float]] | None = None) -> Path:
    """``results[method] = [(mean, ci95) after 0, 1, ... steps]``; RL²'s point ``k`` is its episode
    ``k + 1`` (``k`` episodes of experience). A method with one point (the oracle) is drawn flat.
    ``paper`` (optional): values read from the paper's figure, drawn as faint markers."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    styles = {"maml-trpo": ("tab:green", "-"), "fomaml-trpo": ("tab:olive", "-"), "maml-promp": ("tab:cyan", "-"),
              "pretrained": ("tab:blue", "--"), "random": ("black", ":"), "oracle": ("tab:red", "--"),
              "rl2": ("tab:purple", "-.")}
    longest = max(len(v) for v in results.values())
    for name, points in results.items():
        color, style = styles.get(name, (None, "-"))
        mean = np.array([m for m, _ in points])
        ci = np.array([c for _, c in points])
        xs = np.arange(len(points))
        if len(points) == 1:
            xs, mean, ci = np.array([0, longest - 1]), np.repeat(mean, 2), np.repeat(ci, 2)
        ax.plot(xs, mean, style, color=color, marker="o" if len(points) > 1 else None, label=name)
        ax.fill_between(xs, mean - ci, mean + ci, color=color, alpha=0.15)
    for name, values in (paper or {}).items():
        color = styles.get(name, (None, "-"))[0]
        ax.plot(np.arange(len(values)), values, "x", color=color, alpha=0.5, ms=7)
    ax.set(xlabel=xlabel, ylabel="average return", title=title, xticks=range(longest))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if paper:
        ax.text(0.99, 0.01, "x: values read from the paper's figure", transform=ax.transAxes, ha="right",
                va="bottom", fontsize=7, alpha=0.7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_paths(paths: list[np.ndarray], goals: np.ndarray, path: str | Path, label: str = "MAML") -> Path:
    """One panel per goal: ``paths[0]`` (before adaptation, ``[goals, T, 2]``) dashed, then the path
    after each adaptation step, darker with each step; the goal a star, the start a dot."""
    plt = _plt()
    steps = len(paths) - 1
    fig, axes = plt.subplots(1, len(goals), figsize=(3.2 * len(goals), 3.4), squeeze=False)
    for i, ax in enumerate(axes[0]):
        ax.plot(paths[0][i, :, 0], paths[0][i, :, 1], "--", color="tab:orange", lw=1.8, label="pre-update")
        for k, shade in zip(range(1, steps + 1), np.linspace(0.45, 1.0, steps)):
            ax.plot(paths[k][i, :, 0], paths[k][i, :, 1], color=plt.cm.Blues(shade), lw=1.5,
                    label=f"{k} step{'s' if k > 1 else ''}")
        ax.plot(*goals[i], marker="*", color="red", ms=14, ls="", label="goal")
        ax.plot(0, 0, marker="o", color="grey", ms=5, ls="")
        ax.set(xlim=(-0.6, 0.6), ylim=(-0.6, 0.6), aspect="equal", title=f"{label}: goal {i + 1}")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ci_table(results: dict[str, list[tuple[float, float]]], header: str = "after k steps") -> str:
    """Markdown table: one row per method, ``mean ± ci95`` per step."""
    longest = max(len(v) for v in results.values())
    lines = [f"| method | " + " | ".join(f"{header.replace('k', str(k))}" for k in range(longest)) + " |",
             "|---|" + "---|" * longest]
    for name, points in results.items():
        cells = [f"{m:.2f} ± {c:.2f}" for m, c in points] + [""] * (longest - len(points))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
