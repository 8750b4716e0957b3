"""N-way K-shot Q-query episodes over any labelled data set (:class:`LabelledExamples`).

Every episode is a pure function of ``(seed, batch index, task position)``: no global RNG,
no hidden state. So the same seed always gives the same episodes, resuming a run needs only
the step counter, and several ranks can each draw their own share of a meta-batch and still
see exactly the tasks a single process would.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from metamap.errors import EpisodeError
from metamap.tasks.batch import TaskBatch
from metamap.tasks.kinds import CLASSIFICATION, TaskKind


class LabelledExamples(Protocol):
    """What an :class:`EpisodeSampler` draws from (:class:`metamap.data.dataset.ClassDataset` is one)."""

    num_classes: int
    class_names: list[str]
    description: str

    def class_counts(self) -> np.ndarray: ...

    def indices_of(self, c: int) -> np.ndarray: ...

    def inputs(self, index: torch.Tensor) -> torch.Tensor: ...


class TaskSampler(Protocol):
    """Anything that yields meta-batches of tasks by index (episodes, regression tasks...).

    ``kind`` is the tasks' :class:`~metamap.tasks.kinds.TaskKind` (loss, metrics, evaluation);
    ``examples_per_task`` sizes evaluation chunks. A batch needs ``num_tasks``, ``slice``,
    ``to`` and ``pin_memory`` (as :class:`TaskBatch` has) for the trainer to run it.
    """

    tasks_per_batch: int
    kind: TaskKind
    examples_per_task: int

    def batch(self, index: int, rank: int = 0, world_size: int = 1) -> TaskBatch: ...

    def episodes(self, ids) -> TaskBatch: ...

    def describe(self) -> str: ...


def shard(n: int, rank: int, world_size: int) -> range:
    """The positions ``0..n-1`` that ``rank`` of ``world_size`` owns (contiguous, near-equal)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def check_positive(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise EpisodeError(f"{name} must be a whole number >= 1, not {v!r}")


class EpisodeSampler:
    """Draws ``tasks_per_batch`` N-way K-shot Q-query classification tasks per batch.

    Support examples come class by class (labels ``[0]*K + [1]*K + ...``), as do queries;
    which dataset class becomes label ``j`` is random per task.
    """

    kind = CLASSIFICATION

    def __init__(self, dataset: LabelledExamples, ways: int, shots: int, queries: int,
                 tasks_per_batch: int = 1, seed: int = 0):
        check_positive(ways=ways, shots=shots, queries=queries, tasks_per_batch=tasks_per_batch)
        if ways < 2:
            raise EpisodeError(f"ways must be at least 2 for a classification task, not {ways}")
        if ways > dataset.num_classes:
            raise EpisodeError(
                f"cannot draw {ways}-way tasks: {dataset.description or 'the data set'} has only "
                f"{dataset.num_classes} classes; ask for at most {dataset.num_classes} ways")
        counts = dataset.class_counts()
        need = shots + queries
        small = np.flatnonzero(counts < need)
        if len(small):
            names = ", ".join(f"{dataset.class_names[c]} ({counts[c]})" for c in small[:5])
            more = f" and {len(small) - 5} more" if len(small) > 5 else ""
            raise EpisodeError(
                f"{shots}-shot {queries}-query tasks need {need} examples per class, but "
                f"{len(small)} of {dataset.num_classes} classes have fewer: {names}{more}; "
                f"lower shots + queries to at most {int(counts.min())} or remove those classes")
        self.dataset, self.ways, self.shots, self.queries = dataset, ways, shots, queries
        self.tasks_per_batch, self.seed = tasks_per_batch, int(seed)

    @property
    def examples_per_task(self) -> int:
        return self.ways * (self.shots + self.queries)

    def describe(self) -> str:
        return f"{self.ways}-way {self.shots}-shot, {self.queries} queries/class"

    def task_indices(self, index: int, position: int) -> tuple[np.ndarray, np.ndarray]:
        """Dataset positions ``[ways, shots+queries]`` and chosen classes ``[ways]`` of one task."""
        rng = np.random.default_rng([self.seed, index, position])
        classes = rng.choice(self.dataset.num_classes, self.ways, replace=False)
        picks = np.stack([
            self.dataset.indices_of(c)[rng.choice(len(self.dataset.indices_of(c)), self.shots + self.queries,
                                                  replace=False)]
            for c in classes])
        return picks, classes

    def batch(self, index: int, rank: int = 0, world_size: int = 1) -> TaskBatch:
        """Meta-batch ``index``; with ``world_size > 1``, only this rank's share of its tasks."""
        return self.tasks([(index, p) for p in shard(self.tasks_per_batch, rank, world_size)])

    def episodes(self, ids) -> TaskBatch:
        """Fixed evaluation episodes: episode ``e`` is task 0 of batch ``e``, whatever the chunking."""
        return self.tasks([(int(e), 0) for e in ids])

    def tasks(self, keys: list[tuple[int, int]]) -> TaskBatch:
        """The tasks at ``(batch index, position)`` keys, stacked along the task dimension."""
        return self.task_positions(keys).map_inputs(self.dataset.inputs)

    def episode_positions(self, ids) -> TaskBatch:
        """:meth:`episodes` with dataset positions (``long [T, S]``, ``[T, Q]``) in place of inputs."""
        return self.task_positions([(int(e), 0) for e in ids])

    def task_positions(self, keys: list[tuple[int, int]]) -> TaskBatch:
        """:meth:`tasks` with the examples' positions in the dataset in place of their inputs."""
        if not keys:
            raise EpisodeError("no tasks requested (is the meta-batch smaller than the number of ranks?)")
        picks, classes = zip(*(self.task_indices(i, p) for i, p in keys))
        picks = torch.from_numpy(np.stack(picks))             # [T, ways, shots+queries]
        k, t = self.shots, len(keys)
        labels = torch.arange(self.ways)
        return TaskBatch(
            support_x=picks[:, :, :k].flatten(1),             # class-major order
            support_y=labels.repeat_interleave(k).expand(t, -1).clone(),
            query_x=picks[:, :, k:].flatten(1),
            query_y=labels.repeat_interleave(self.queries).expand(t, -1).clone(),
            ways=self.ways,
            classes=torch.from_numpy(np.stack(classes)),
        )
