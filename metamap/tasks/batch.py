"""Tasks travel as batched tensors with a leading task dimension."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class TaskBatch:
    """A meta-batch of tasks, each a support set and a query set.

    Shapes (T tasks, S support and Q query examples per task):
        support_x: [T, S, *example_shape]   support_y: [T, S]
        query_x:   [T, Q, *example_shape]   query_y:   [T, Q]

    Classification labels are ``torch.long`` in ``0 .. ways-1`` within each task;
    regression targets are floating point (``[T, S]`` or ``[T, S, out_dim]``).
    ``classes`` optionally records, per task, which dataset class each label stands for
    (``[T, ways]``), for reports and debugging.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    ways: int = 0
    classes: Tensor | None = None

    def __post_init__(self) -> None:
        t = self.support_x.shape[0]
        for f in ("support_y", "query_x", "query_y"):
            if getattr(self, f).shape[0] != t:
                raise ValueError(
                    f"TaskBatch: {f} has {getattr(self, f).shape[0]} tasks but support_x has {t}; "
                    "every field needs the same leading task dimension")
        if self.support_x.shape[:2] != self.support_y.shape[:2]:
            raise ValueError(f"TaskBatch: support_x {tuple(self.support_x.shape)} and support_y "
                             f"{tuple(self.support_y.shape)} disagree on [tasks, examples]")
        if self.query_x.shape[:2] != self.query_y.shape[:2]:
            raise ValueError(f"TaskBatch: query_x {tuple(self.query_x.shape)} and query_y "
                             f"{tuple(self.query_y.shape)} disagree on [tasks, examples]")

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def __len__(self) -> int:
        return self.num_tasks

    @property
    def is_classification(self) -> bool:
        return not torch.is_floating_point(self.support_y)

    def to(self, device=None, dtype=None, memory_format=None, non_blocking: bool = False) -> TaskBatch:
        """Move to a device; ``dtype`` and ``memory_format`` apply to the inputs only."""
        def move_x(x: Tensor) -> Tensor:
            x = x.to(device=device, dtype=dtype if dtype is not None and x.is_floating_point() else None,
                     non_blocking=non_blocking)
            if memory_format is not None and x.dim() == 5:
                # channels-last applies to [N, C, H, W]; fold the task dimension in and out.
                t = x.shape[0]
                x = x.flatten(0, 1).contiguous(memory_format=memory_format).unflatten(0, (t, -1))
            return x
        return TaskBatch(move_x(self.support_x), self.support_y.to(device, non_blocking=non_blocking),
                         move_x(self.query_x), self.query_y.to(device, non_blocking=non_blocking), self.ways,
                         None if self.classes is None else self.classes.to(device))

    def map_inputs(self, fn) -> TaskBatch:
        """``fn`` applied to ``support_x`` and ``query_x`` (e.g. dataset positions -> inputs or codes)."""
        return TaskBatch(fn(self.support_x), self.support_y, fn(self.query_x), self.query_y, self.ways, self.classes)

    def pin_memory(self) -> TaskBatch:
        """Page-locked copies, so that a later ``to("cuda", non_blocking=True)`` overlaps with compute."""
        return TaskBatch(self.support_x.pin_memory(), self.support_y.pin_memory(), self.query_x.pin_memory(),
                         self.query_y.pin_memory(), self.ways, self.classes)

    def task(self, i: int) -> TaskBatch:
        """Task ``i`` alone, still with a leading task dimension of 1."""
        return self.slice(i, i + 1)

    def slice(self, start: int, stop: int) -> TaskBatch:
        """Tasks ``start .. stop-1`` (for chunking a meta-batch or sharding it across ranks)."""
        return TaskBatch(self.support_x[start:stop], self.support_y[start:stop], self.query_x[start:stop],
                         self.query_y[start:stop], self.ways,
                         None if self.classes is None else self.classes[start:stop])

    @staticmethod
    def cat(batches: list[TaskBatch]) -> TaskBatch:
        """Concatenate along the task dimension."""
        if not batches:
            raise ValueError("TaskBatch.cat needs at least one batch")
        classes = [b.classes for b in batches]
        return TaskBatch(*(torch.cat([getattr(b, f.name) for b in batches]) for f in fields(TaskBatch)[:4]),
                         ways=batches[0].ways,
                         classes=None if any(c is None for c in classes) else torch.cat(classes))
