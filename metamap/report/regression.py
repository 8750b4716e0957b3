"""The test-task figure of few-shot regression runs: true functions, support points, predictions."""
from __future__ import annotations

from pathlib import Path

import torch


def regression_tasks(learner, sampler, path: str | Path, ids=(0, 1, 2, 3), steps=(1, 10)) -> Path:
    """PNG of a few test tasks of a regression ``sampler`` (sinusoids, lines): the true function,
    the support points and the learner's predictions after adapting to them.

    Any learner works: one that can report its predictions along the way (``adapt_trajectory``:
    gradient-based learners) is drawn before adaptation and after each number of inner steps in
    ``steps``; any other after its adaptation.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sampler.episodes(list(ids))
    params = sampler.params_of(list(ids))
    grid = torch.linspace(*sampler.x_range, 200)
    query = grid.reshape(1, -1, 1).expand(len(ids), -1, -1)
    was = learner.training
    learner.eval()
    try:
        with torch.set_grad_enabled(learner.adapts_with_gradients):
            if hasattr(learner, "adapt_trajectory"):
                trajectory = learner.adapt_trajectory(tasks.support_x, tasks.support_y, max(steps))
                curves = {f"after {k} step{'s' if k > 1 else ''}" if k else "before adaptation":
                          trajectory[k](query)[..., 0].detach() for k in (0, *steps)}
            else:
                adapted = learner.adapt_tasks(tasks.support_x, tasks.support_y, 0)
                curves = {"after adaptation": adapted(query).reshape(len(ids), -1).detach()}
    finally:
        learner.train(was)
    fig, axes = plt.subplots(1, len(ids), figsize=(4 * len(ids), 3.2), squeeze=False)
    for i, ax in enumerate(axes[0]):
        ax.plot(grid, sampler.function(params[i], grid), color="black", lw=2, label="ground truth")
        for (label, curve), style in zip(curves.items(), (":", "--", "-", "-.")):
            ax.plot(grid, curve[i], style, label=label)
        ax.scatter(tasks.support_x[i, :, 0], tasks.support_y[i], color="red", zorder=3,
                   label=f"{sampler.shots} support points")
        ax.set_title(", ".join(f"{n} {float(v):.2f}" for n, v in zip(sampler.param_names, params[i])))
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
