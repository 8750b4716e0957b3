"""Learning curves of a run, from its metrics.jsonl, as a PNG."""
from __future__ import annotations

from pathlib import Path

from metamap.metrics_log import read_records


def read_metrics(run_dir: str | Path) -> list[dict]:
    return read_records(Path(run_dir) / "metrics.jsonl")


# Keys of a training record that are not metrics of the task kind.
BOOKKEEPING = {"step", "loss", "lr", "tasks_per_s", "elapsed_s", "rss_mb", "peak_rss_mb", "cuda_peak_mb", "event"}


def validation_key(rows: list[dict]) -> str | None:
    """The validation metric's key (``val_accuracy``, ``val_mse``...) in a run's records."""
    for r in rows:
        if "val_metric" in r:
            return "val_" + r["val_metric"]
    for r in rows:           # runs logged before validation records named their metric
        for k in ("val_accuracy", "val_mse"):
            if k in r:
                return k
    return None


def score_key(train: list[dict], val: list[dict]) -> str | None:
    """The metric to plot beside the loss: the validated one if training logs it, else the first."""
    key = validation_key(val)
    if key and key[4:] in train[0]:
        return key[4:]
    return next((k for k, v in train[0].items() if k not in BOOKKEEPING and isinstance(v, (int, float))), None)


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
    score = score_key(train, val)
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
