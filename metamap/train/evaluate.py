"""The one evaluator: a fixed set of episodes, mean ± 95% confidence interval."""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from metamap.algorithms.base import EncodingLearner, MetaLearner
from metamap.data.memory import check_fits, graph_bytes_per_example, input_bytes
from metamap.tasks.batch import TaskBatch
from metamap.tasks.kinds import Metric, TaskKind
from metamap.tasks.sampler import TaskSampler, shard
from metamap.train.precision import autocast
from metamap.train.progress import progress_bar
from metamap.train.test_time import finetune_predictions


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
    finetune: dict | None = None      # test-time fine-tuning used (lr, steps, how they were chosen)

    def summary(self) -> str:
        fmt = Metric(self.metric, self.higher_is_better, self.percent).format
        extra = "".join(f", {k} {fmt_of(k, v)}" for k, v in self.others.items())
        tuned = ""
        if self.finetune:
            tuned = f", fine-tuned at test time: lr {self.finetune['lr']:g}, {self.finetune['steps']} steps"
        return (f"{self.setting}: {fmt(self.mean, self.ci95)}{extra} ({self.episodes} episodes, "
                f"seed {self.seed}{tuned})")

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


# Codes of distinct examples kept at once during evaluation (MB); 0 = encode per episode.
DEFAULT_CACHE_MB = 1024
# Input elements per encoder pass when encoding examples for the cache (about 8 MB of float32).
ENCODE_ELEMENTS = 2**21


def confidence_interval(scores: torch.Tensor) -> tuple[float, float, float]:
    """``(mean, 1.96 * std / sqrt(n), std)`` with the sample standard deviation (n - 1)."""
    scores = scores.double()
    n = scores.numel()
    std = float(scores.std(unbiased=True)) if n > 1 else 0.0
    return float(scores.mean()), 1.96 * std / math.sqrt(n), std


def default_chunk(sampler: TaskSampler) -> int:
    """Episodes per forward pass: about 2,000 examples, at most 50 episodes."""
    return max(1, min(50, 2000 // max(sampler.examples_per_task, 1)))


def check_eval_memory(learner: MetaLearner, sampler: TaskSampler, episodes: int, chunk: int = 0,
                      finetune: bool = False, cache_mb: float = DEFAULT_CACHE_MB) -> None:
    """Refuse, before any episode is drawn, an evaluation pass that cannot fit: ``chunk`` episodes
    (0 = :func:`default_chunk`) of float32 inputs, held twice while normalised, and for learners that
    adapt by gradient steps (or fine-tune) what each example keeps for the backward pass. Learners
    whose codes are cached encode a bounded batch at a time: nothing to check. Samplers without a
    data set of known example shape are not checked."""
    shape = getattr(getattr(sampler, "dataset", None), "example_shape", None)
    was_training = learner.training
    cached = cache_mb > 0 and not finetune and can_cache(learner.eval(), sampler)     # as evaluate() sees it
    learner.train(was_training)
    if shape is None or cached:
        return
    shape = tuple(shape)
    tasks = min(chunk or default_chunk(sampler), episodes)
    per_task = sampler.examples_per_task
    graph = graph_bytes_per_example(learner, shape) if learner.adapts_with_gradients or finetune else 0
    check_fits(tasks * per_task * (2 * input_bytes(shape) + graph),
               f"evaluating {tasks} episode(s) at a time ({per_task} examples of {'x'.join(map(str, shape))} each)",
               "choose a smaller eval.tasks_per_batch (0 = about 2,000 examples per pass)")


def evaluate(learner: MetaLearner, sampler: TaskSampler, episodes: int = 1000, chunk: int = 0,
             device: str | torch.device = "cpu", memory_format=None, progress: bool = True,
             setting: str = "", rank: int = 0, world_size: int = 1, precision: str = "fp32",
             cache_mb: float = DEFAULT_CACHE_MB, finetune=None) -> EvalResult:
    """Score ``learner`` on episodes ``0 .. episodes-1`` of ``sampler`` (fixed by its seed).

    The sampler's task kind adapts and scores (``kind.evaluate``) and names the metrics.
    With several ranks, each evaluates its share of the episodes and the scores are gathered,
    so the result is the same as one process evaluating them all. ``precision`` (bf16/fp16)
    runs the learner under autocast, as in training (``auto`` is resolved by the caller:
    :func:`metamap.train.precision.resolve_precision`).

    Learners that encode each example on its own (:class:`EncodingLearner`) see every distinct
    example of the episodes encoded once, in blocks of episodes whose codes fit in ``cache_mb``
    megabytes, instead of once per episode it appears in: the same predictions (to rounding)
    for a fraction of the forward passes. ``cache_mb = 0`` encodes per episode.

    ``finetune`` (a :class:`metamap.train.test_time.FineTuning`) fine-tunes the learner on each
    episode's support set before it adapts (test-time fine-tuning); the weights change per
    episode, so codes are never cached then, and they are restored after every episode.
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
        cached = cache_mb > 0 and finetune is None and can_cache(learner, sampler)
        check_eval_memory(learner, sampler, len(mine), chunk, finetune is not None, cache_mb)
        with torch.set_grad_enabled(learner.adapts_with_gradients), autocast(precision, device):
            batches = (cached_episodes(learner, sampler, mine, chunk, device, memory_format, cache_mb) if cached
                       else episode_inputs(sampler, mine, chunk, device, memory_format))
            done = 0
            for tasks in batches:
                if finetune is not None:
                    outputs = finetune_predictions(learner, tasks, mine[done:done + len(tasks)], finetune)[0]
                    got = kind.scores(outputs, tasks.query_y)
                elif cached:
                    outputs = learner.adapt_encoded(tasks.support_x, tasks.support_y, tasks.ways)(tasks.query_x)
                    got = kind.scores(outputs.detach().float(), tasks.query_y)
                else:
                    got = kind.evaluate(learner, kind.collect(tasks, learner))
                done += len(tasks)
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


def episode_inputs(sampler: TaskSampler, ids: list[int], chunk: int, device, memory_format) -> Iterator[TaskBatch]:
    """The episodes ``ids``, ``chunk`` at a time, with their inputs on ``device``."""
    for start in range(0, len(ids), chunk):
        yield sampler.episodes(ids[start:start + chunk]).to(device, memory_format=memory_format)


def can_cache(learner: MetaLearner, sampler: TaskSampler) -> bool:
    """Whether episodes can be built from codes encoded once (call in evaluation mode)."""
    # Only for kinds that evaluate the plain way (adapt, predict the queries, score them).
    plain = type(sampler.kind).evaluate is TaskKind.evaluate and type(sampler.kind).collect is TaskKind.collect
    return (plain and isinstance(learner, EncodingLearner) and learner.encodes_per_example()
            and hasattr(sampler, "episode_positions") and hasattr(sampler, "dataset"))


def cached_episodes(learner: EncodingLearner, sampler, ids: list[int], chunk: int, device, memory_format,
                    cache_mb: float) -> Iterator[TaskBatch]:
    """The episodes ``ids``, ``chunk`` at a time, with the learner's codes of their examples.

    Episodes are taken in blocks whose distinct examples' codes fit in ``cache_mb``; each block's
    distinct examples are encoded once. An episode too large to fit alone is encoded on its own.
    """
    dataset = sampler.dataset
    positions = sampler.episode_positions(ids)
    probe = encode_examples(learner, dataset, positions.support_x[0, :1], device, memory_format)
    capacity = int(cache_mb * 2**20) // max(probe[0].numel() * probe.element_size(), 1)
    for first, last in blocks_within(positions, capacity):
        block = positions.slice(first, last)
        distinct, inverse = torch.unique(torch.cat([block.support_x.flatten(), block.query_x.flatten()]),
                                         return_inverse=True)
        if len(distinct) > capacity:            # one episode alone is too large to cache
            for tasks in episode_inputs(sampler, ids[first:last], chunk, device, memory_format):
                yield tasks.map_inputs(learner.encode)
            continue
        codes = encode_examples(learner, dataset, distinct, device, memory_format)
        n_support = block.support_x.numel()
        local = TaskBatch(inverse[:n_support].view_as(block.support_x), block.support_y,
                          inverse[n_support:].view_as(block.query_x), block.query_y, block.ways, block.classes)
        for start in range(0, len(local), chunk):
            part = local.slice(start, start + chunk)
            yield part.map_inputs(lambda where: codes[where.to(codes.device)]).to(device)


def blocks_within(positions: TaskBatch, capacity: int) -> Iterator[tuple[int, int]]:
    """Consecutive ``(first, last)`` episode ranges whose distinct examples number at most
    ``capacity`` (an episode larger than that on its own is a block of one)."""
    every = torch.cat([positions.support_x.flatten(1), positions.query_x.flatten(1)], 1)
    if len(torch.unique(every)) <= capacity:
        yield 0, len(every)
        return
    first, seen = 0, set()
    for e, row in enumerate(every.tolist()):
        grown = seen | set(row)
        if len(grown) > capacity and e > first:
            yield first, e
            first, grown = e, set(row)
        seen = grown
    yield first, len(every)


def encode_examples(learner: EncodingLearner, dataset, index: Tensor, device, memory_format) -> Tensor:
    """Codes ``[len(index), *code]`` of the dataset's examples at ``index``, a bounded batch at a time."""
    per_pass = max(1, min(1000, ENCODE_ELEMENTS // max(math.prod(dataset.example_shape), 1)))
    out = []
    with torch.no_grad():
        for start in range(0, len(index), per_pass):
            x = dataset.inputs(index[start:start + per_pass]).to(device).unsqueeze(0)   # one "task"
            if memory_format is not None and x.dim() == 5:
                x = x[0].contiguous(memory_format=memory_format).unsqueeze(0)
            out.append(learner.encode(x)[0])
    return torch.cat(out)


def _gather(local: torch.Tensor, total: int, world_size: int) -> torch.Tensor:
    import torch.distributed as dist
    size = max(len(shard(total, r, world_size)) for r in range(world_size))
    padded = torch.zeros(size, dtype=local.dtype)
    padded[:len(local)] = local
    out = [torch.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(out, padded)
    return torch.cat([o[:len(shard(total, r, world_size))] for r, o in enumerate(out)])
