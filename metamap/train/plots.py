"""Learning curves of a run, from its metrics.jsonl, as a PNG."""
from __future__ import annotations

from pathlib import Path

from metamap.train.metrics_log import read_records


def read_metrics(run_dir: str | Path) -> list[dict]:
    return read_records(Path(run_dir) / "metrics.jsonl")


def plot_curves(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Training loss and score against the step, with validation scores; ``None`` if nothing to plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [r for r in rows if "loss" in r and "event" not in r]
    val = [r for r in rows if any(k.startswith("val_") and k != "val_ci95" and k != "val_setting" for k in r)]
    if not train:
        return None
    score = "accuracy" if "accuracy" in train[0] else "mse" if "mse" in train[0] else None
    fig, axes = plt.subplots(1, 2 if score else 1, figsize=(11 if score else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    ax.set(xlabel="meta-training batch", ylabel="training loss", title="loss")
    ax.grid(alpha=0.3)
    if score:
        ax = axes[0][1]
        ax.plot([r["step"] for r in train], [r[score] for r in train], lw=1, label=f"training {score}")
        vkey = f"val_{score}"
        vs = [r for r in val if vkey in r]
        if vs:
            ax.errorbar([r["step"] for r in vs], [r[vkey] for r in vs], yerr=[r.get("val_ci95", 0) for r in vs],
                        marker="o", capsize=3, label=f"validation {score} ({vs[0].get('val_setting', '')})")
        ax.set(xlabel="meta-training batch", ylabel=score, title=score)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
