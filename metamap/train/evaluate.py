"""The one evaluator: a fixed set of episodes, mean ± 95% confidence interval."""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field

import torch

from metamap.algorithms.base import MetaLearner
from metamap.tasks.kinds import Metric
from metamap.tasks.sampler import TaskSampler, shard
from metamap.train.progress import progress_bar


@dataclass
class EvalResult:
    """``mean`` and ``ci95`` are in the metric's unit (accuracy as a fraction, or MSE).

    ``metric`` is the task kind's first metric (the one that chooses the best checkpoint) and
    ``higher_is_better`` its direction; ``others`` holds the kind's other metrics as
    ``name -> {"mean", "ci95", "std", "higher_is_better"}``.
    """

    metric: str
    mean: float
    ci95: float
    std: float
    episodes: int
    setting: str
    seed: int
    scores: list[float] = field(default_factory=list, repr=False)
    higher_is_better: bool = True
    percent: bool = False
    others: dict[str, dict] = field(default_factory=dict)

    def summary(self) -> str:
        fmt = Metric(self.metric, self.higher_is_better, self.percent).format
        extra = "".join(f", {k} {fmt_of(k, v)}" for k, v in self.others.items())
        return f"{self.setting}: {fmt(self.mean, self.ci95)}{extra} ({self.episodes} episodes, seed {self.seed})"

    def better_than(self, mean: float | None) -> bool:
        """Whether this result beats an earlier one's mean (``None``: nothing to beat)."""
        return mean is None or Metric(self.metric, self.higher_is_better).better(self.mean, mean)

    def to_dict(self, with_scores: bool = False) -> dict:
        d = asdict(self)
        if not with_scores:
            d.pop("scores")
        return d


def fmt_of(name: str, summary: dict) -> str:
    return Metric(name, summary["higher_is_better"], summary.get("percent", False)).format(summary["mean"],
                                                                                           summary["ci95"])


def confidence_interval(scores: torch.Tensor) -> tuple[float, float, float]:
    """``(mean, 1.96 * std / sqrt(n), std)`` with the sample standard deviation (n - 1)."""
    scores = scores.double()
    n = scores.numel()
    std = float(scores.std(unbiased=True)) if n > 1 else 0.0
    return float(scores.mean()), 1.96 * std / math.sqrt(n), std


def default_chunk(sampler: TaskSampler) -> int:
    """Episodes per forward pass: about 2,000 examples, at most 50 episodes."""
    return max(1, min(50, 2000 // max(sampler.examples_per_task, 1)))


def evaluate(learner: MetaLearner, sampler: TaskSampler, episodes: int = 1000, chunk: int = 0,
             device: str | torch.device = "cpu", memory_format=None, progress: bool = True,
             setting: str = "", rank: int = 0, world_size: int = 1, precision: str = "fp32") -> EvalResult:
    """Score ``learner`` on episodes ``0 .. episodes-1`` of ``sampler`` (fixed by its seed).

    The sampler's task kind adapts and scores (``kind.evaluate``) and names the metrics.
    With several ranks, each evaluates its share of the episodes and the scores are gathered,
    so the result is the same as one process evaluating them all. ``precision`` (bf16/fp16)
    runs the learner under autocast, as in training.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, not {episodes}")
    kind = sampler.kind
    chunk = chunk or default_chunk(sampler)
    mine = list(shard(episodes, rank, world_size))
    was_training = learner.training
    learner.eval()
    scores: dict[str, list] = {m.name: [] for m in kind.metrics}
    primary = kind.primary.name
    bar = progress_bar(total=len(mine), desc=f"eval {setting}".strip(), enabled=progress and rank == 0,
                       unit="ep")
    try:
        half = torch.bfloat16 if precision == "bf16" else torch.float16
        autocast = (torch.autocast(torch.device(device).type, dtype=half) if precision != "fp32"
                    else contextlib.nullcontext())
        with torch.set_grad_enabled(learner.adapts_with_gradients), autocast:
            for start in range(0, len(mine), chunk):
                tasks = sampler.episodes(mine[start:start + chunk]).to(device, memory_format=memory_format)
                got = kind.evaluate(learner, kind.collect(tasks, learner))
                for name in scores:
                    scores[name].append(got[name].detach().double().cpu())
                bar.update(len(got[primary]))
                bar.set_postfix(mean=f"{float(torch.cat(scores[primary]).mean()):.4f}", refresh=False)
    finally:
        bar.close()
        learner.train(was_training)
    summaries = {}
    for m in kind.metrics:
        values = torch.cat(scores[m.name])
        if world_size > 1:
            values = _gather(values, episodes, world_size)
        mean, ci, std = confidence_interval(values)
        summaries[m.name] = (values, {"mean": mean, "ci95": ci, "std": std, "higher_is_better": m.higher_is_better,
                                      "percent": m.percent})
    values, head = summaries.pop(primary)
    return EvalResult(primary, head["mean"], head["ci95"], head["std"], episodes, setting or sampler.describe(),
                      int(getattr(sampler, "seed", 0)), values.tolist(), kind.primary.higher_is_better,
                      kind.primary.percent, {k: v for k, (_, v) in summaries.items()})


def _gather(local: torch.Tensor, total: int, world_size: int) -> torch.Tensor:
    import torch.distributed as dist
    size = max(len(shard(total, r, world_size)) for r in range(world_size))
    padded = torch.zeros(size, dtype=local.dtype)
    padded[:len(local)] = local
    out = [torch.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(out, padded)
    return torch.cat([o[:len(shard(total, r, world_size))] for r, o in enumerate(out)])
