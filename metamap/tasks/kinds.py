"""Task kinds: what a family of tasks is, apart from its data.

A task kind says how a predictor is adapted and scored on its tasks: the adaptation loss
(per task), the metrics (per task, each with its direction), and how a learner is evaluated on
a batch of tasks. The trainer, the evaluator, the best-checkpoint choice, checkpoints and the
CLI only go through this interface, so a new kind of task (trajectories collected by the
current policy, say) needs a sampler and a kind, and nothing else changes.

A data source names its kind in ``DataInfo.problem``; :func:`metamap.registry.task_kind` turns
the name into the object, which samplers carry as ``sampler.kind`` and learners as
``learner.kind``. Kinds register with :func:`metamap.registry.register_task_kind`::

    @register_task_kind("l1-regression")
    class L1Regression(TaskKind):
        metrics = (Metric("mae", higher_is_better=False),)

        def loss(self, outputs, targets):          # [T]
            return (outputs.reshape(targets.shape) - targets).abs().flatten(1).mean(1)

        def scores(self, outputs, targets):        # name -> [T]
            return {"mae": self.loss(outputs, targets)}

A sampler of labelled tensors returns :class:`~metamap.tasks.batch.TaskBatch`es. A kind whose
support data depends on the learner (an environment's trajectories collected by the current
policy) overrides :meth:`TaskKind.collect`, which the trainer and the evaluator call with the
learner before handing the batch over, and :meth:`TaskKind.evaluate`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from metamap.registry import register_task_kind


@dataclass(frozen=True)
class Metric:
    """A per-task score and which way is better; ``percent``: shown as a percentage."""

    name: str
    higher_is_better: bool = True
    percent: bool = False

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b``."""
        return a > b if self.higher_is_better else a < b

    def format(self, mean: float, ci95: float) -> str:
        if self.percent:
            return f"{100 * mean:.2f}% ± {100 * ci95:.2f}%"
        return f"{mean:.4f} ± {ci95:.4f} {self.name}"


class TaskKind:
    """Base class of task kinds. ``metrics[0]`` chooses the best checkpoint and heads reports.

    ``classes``: targets are class labels ``0..ways-1`` (heads have ``ways`` outputs), else
    real-valued targets with ``DataInfo.output_dim`` values per example.
    """

    name: ClassVar[str] = ""
    metrics: ClassVar[tuple[Metric, ...]] = ()
    classes: ClassVar[bool] = False
    # Further keys of a learner's training record that the progress bar shows (e.g. RL's KL).
    progress: ClassVar[tuple[str, ...]] = ()

    @property
    def primary(self) -> Metric:
        return self.metrics[0]

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``[T]``: each task's mean adaptation / query loss."""
        raise NotImplementedError

    def scores(self, outputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Metric name -> ``[T]`` per-task values, for every metric in :attr:`metrics`."""
        raise NotImplementedError

    def output_size(self, ways: int, output_dim: int) -> int:
        """How many outputs per example a predictor head has."""
        return ways if self.classes else output_dim

    def collect(self, tasks, learner):
        """The batch a learner sees; kinds whose data the learner collects override this."""
        return tasks

    def evaluate(self, learner, tasks) -> dict[str, Tensor]:
        """Adapt ``learner`` to each task's support set and score its query predictions."""
        outputs = learner.adapt_tasks(tasks.support_x, tasks.support_y, tasks.ways)(tasks.query_x)
        return self.scores(outputs.detach().float(), tasks.query_y)

    def __repr__(self) -> str:
        return f"<task kind {self.name!r}>"

    # Kinds hold no state: two objects of one kind are the same kind.
    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.name == other.name

    def __hash__(self) -> int:
        return hash((type(self), self.name))


@register_task_kind("classification")
class Classification(TaskKind):
    """Labels ``0..ways-1``; cross-entropy of logits ``[T, N, ways]``; accuracy."""

    metrics = (Metric("accuracy", higher_is_better=True, percent=True),)
    classes = True

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        t = targets.shape[0]
        return F.cross_entropy(outputs.flatten(0, 1), targets.flatten(), reduction="none").reshape(t, -1).mean(1)

    def scores(self, outputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        return {"accuracy": (outputs.argmax(-1) == targets).float().mean(1)}


@register_task_kind("regression")
class Regression(TaskKind):
    """Real-valued targets ``[T, N]`` or ``[T, N, d]``; mean squared error."""

    metrics = (Metric("mse", higher_is_better=False),)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return ((outputs.reshape(targets.shape) - targets) ** 2).reshape(targets.shape[0], -1).mean(1)

    def scores(self, outputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        return {"mse": self.loss(outputs, targets)}


CLASSIFICATION, REGRESSION = Classification(), Regression()


def infer_kind(targets: Tensor) -> TaskKind:
    """For bare labelled tensors: class labels are integers, regression targets real numbers."""
    return REGRESSION if torch.is_floating_point(targets) else CLASSIFICATION
