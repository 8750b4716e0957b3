"""The one evaluator: a fixed set of episodes, mean ± 95% confidence interval."""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field

import torch

from metamap.algorithms.base import MetaLearner
from metamap.tasks.sampler import TaskSampler, shard
from metamap.train.progress import progress_bar


@dataclass
class EvalResult:
    """``mean`` and ``ci95`` are in the metric's unit (accuracy as a fraction, or MSE)."""

    metric: str
    mean: float
    ci95: float
    std: float
    episodes: int
    setting: str
    seed: int
    scores: list[float] = field(default_factory=list, repr=False)
    higher_is_better: bool | None = None       # None: from the metric (accuracy yes, mse no)

    def __post_init__(self) -> None:
        if self.higher_is_better is None:
            self.higher_is_better = self.metric != "mse"

    def summary(self) -> str:
        if self.metric == "accuracy":
            value = f"{100 * self.mean:.2f}% ± {100 * self.ci95:.2f}%"
        elif self.metric.startswith("return"):
            value = f"{self.metric} {self.mean:.2f} ± {self.ci95:.2f}"
        else:
            value = f"{self.mean:.4f} ± {self.ci95:.4f} {self.metric}"
        return f"{self.setting}: {value} ({self.episodes} episodes, seed {self.seed})"

    def to_dict(self, with_scores: bool = False) -> dict:
        d = asdict(self)
        if not with_scores:
            d.pop("scores")
        return d


def confidence_interval(scores: torch.Tensor) -> tuple[float, float, float]:
    """``(mean, 1.96 * std / sqrt(n), std)`` with the sample standard deviation (n - 1)."""
    scores = scores.double()
    n = scores.numel()
    std = float(scores.std(unbiased=True)) if n > 1 else 0.0
    return float(scores.mean()), 1.96 * std / math.sqrt(n), std


def default_chunk(sampler: TaskSampler) -> int:
    """Episodes per forward pass: about 2,000 examples, at most 50 episodes."""
    per = getattr(sampler, "ways", 1) * (getattr(sampler, "shots", 1) + getattr(sampler, "queries", 1))
    return max(1, min(50, 2000 // max(per, 1)))


def evaluate(learner: MetaLearner, sampler: TaskSampler, episodes: int = 1000, chunk: int = 0,
             device: str | torch.device = "cpu", memory_format=None, progress: bool = True,
             setting: str = "", rank: int = 0, world_size: int = 1, precision: str = "fp32") -> EvalResult:
    """Score ``learner`` on episodes ``0 .. episodes-1`` of ``sampler`` (fixed by its seed).

    With several ranks, each evaluates its share of the episodes and the scores are gathered,
    so the result is the same as one process evaluating them all. ``precision`` (bf16/fp16)
    runs the learner under autocast, as in training.
    """
    return evaluate_all(learner, sampler, episodes, chunk, device, memory_format, progress, setting, rank,
                        world_size, precision)[0]


def evaluate_all(learner: MetaLearner, sampler: TaskSampler, episodes: int = 1000, chunk: int = 0,
                 device: str | torch.device = "cpu", memory_format=None, progress: bool = True,
                 setting: str = "", rank: int = 0, world_size: int = 1, precision: str = "fp32"
                 ) -> list[EvalResult]:
    """:func:`evaluate` for every metric of the sampler's task kind (the first is the one
    :func:`evaluate` returns and validation selects on).

    A sampler with ``score(learner, tasks) -> {metric: per-task scores [T]}`` and
    ``direction(metric) -> "max" | "min"`` scores its own tasks (RL: returns after each number of
    adaptation steps); otherwise the learner adapts to the support set and the query predictions
    are scored (accuracy or MSE).
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, not {episodes}")
    chunk = chunk or default_chunk(sampler)
    mine = list(shard(episodes, rank, world_size))
    was_training = learner.training
    learner.eval()
    scores: dict[str, list[torch.Tensor]] = {}
    bar = progress_bar(total=len(mine), desc=f"eval {setting}".strip(), enabled=progress and rank == 0,
                       unit="ep")
    try:
        half = torch.bfloat16 if precision == "bf16" else torch.float16
        autocast = (torch.autocast(torch.device(device).type, dtype=half) if precision != "fp32"
                    else contextlib.nullcontext())
        with torch.set_grad_enabled(learner.adapts_with_gradients), autocast:
            for start in range(0, len(mine), chunk):
                tasks = sampler.episodes(mine[start:start + chunk]).to(device, memory_format=memory_format)
                if hasattr(sampler, "score"):
                    part = {k: v.detach().double().cpu() for k, v in sampler.score(learner, tasks).items()}
                else:
                    outputs = learner.adapt_tasks(tasks.support_x, tasks.support_y, tasks.ways)(tasks.query_x)
                    metric = "mse" if getattr(sampler, "regression", False) else "accuracy"
                    part = {metric: learner.per_task_score(outputs.detach().float(), tasks.query_y).cpu()}
                for k, v in part.items():
                    scores.setdefault(k, []).append(v)
                first = next(iter(scores.values()))
                bar.update(len(first[-1]))
                bar.set_postfix(mean=f"{float(torch.cat(first).mean()):.4f}", refresh=False)
    finally:
        bar.close()
        learner.train(was_training)
    direction = getattr(sampler, "direction", None)
    results = []
    for metric, parts in scores.items():
        scores_t = torch.cat(parts).double()
        if world_size > 1:
            scores_t = _gather(scores_t, episodes, world_size)
        mean, ci, std = confidence_interval(scores_t)
        higher = direction(metric) == "max" if direction is not None else None
        results.append(EvalResult(metric, mean, ci, std, episodes, setting or sampler.describe(),
                                  int(getattr(sampler, "seed", 0)), scores_t.tolist(), higher))
    return results


def _gather(local: torch.Tensor, total: int, world_size: int) -> torch.Tensor:
    import torch.distributed as dist
    size = max(len(shard(total, r, world_size)) for r in range(world_size))
    padded = torch.zeros(size, dtype=local.dtype)
    padded[:len(local)] = local
    out = [torch.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(out, padded)
    return torch.cat([o[:len(shard(total, r, world_size))] for r, o in enumerate(out)])
