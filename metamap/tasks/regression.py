"""Few-shot regression task families: sinusoids and lines, as in Finn et al. (2017).

A task is a function ``y = f(x)``; its support set has ``shots`` points and its query set
``queries`` points, all with ``x ~ U[x_min, x_max]``. Like :class:`EpisodeSampler`, every task is
a pure function of ``(seed, split, batch index, position)``, so runs are reproducible, resuming
needs only the step, and ranks can draw their own share of a meta-batch.

    sinusoid: y = A sin(x - phase),  A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]
    linear:   y = a x + b,           a ~ U[-3, 3],  b ~ U[-3, 3],     x ~ U[-5, 5]

Tensors: ``support_x [T, shots, 1]``, ``support_y [T, shots]`` (float), likewise for queries.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import torch

from metamap.errors import ConfigError
from metamap.tasks.batch import TaskBatch
from metamap.tasks.kinds import REGRESSION
from metamap.tasks.sampler import check_positive, shard

FAMILIES = {
    # name: (parameter names, default ranges, function of (x, p0, p1))
    "sinusoid": (("amplitude", "phase"), ((0.1, 5.0), (0.0, math.pi)), lambda x, a, p: a * np.sin(x - p)),
    "linear": (("slope", "intercept"), ((-3.0, 3.0), (-3.0, 3.0)), lambda x, a, b: a * x + b),
}


class RegressionSampler:
    """Meta-batches of ``tasks_per_batch`` regression tasks from one family."""

    kind = REGRESSION

    def __init__(self, family: str, shots: int, queries: int, tasks_per_batch: int = 1, seed: int = 0,
                 split: str = "train", ranges: dict[str, tuple[float, float]] | None = None,
                 x_range: tuple[float, float] = (-5.0, 5.0), noise: float = 0.0):
        if family not in FAMILIES:
            raise ConfigError(f"unknown regression family {family!r}; choose one of {', '.join(FAMILIES)}")
        check_positive(shots=shots, queries=queries, tasks_per_batch=tasks_per_batch)
        names, defaults, self.fn = FAMILIES[family]
        ranges = ranges or {}
        self.ranges = [tuple(ranges.get(n, d)) for n, d in zip(names, defaults)]
        for n, (lo, hi) in zip(names, self.ranges):
            if not lo <= hi:
                raise ConfigError(f"{family} {n} range [{lo}, {hi}] is empty")
        if not x_range[0] < x_range[1]:
            raise ConfigError(f"x range [{x_range[0]}, {x_range[1]}] is empty")
        self.family, self.param_names = family, names
        self.shots, self.queries, self.tasks_per_batch = shots, queries, tasks_per_batch
        self.seed, self.split, self.x_range, self.noise = int(seed), split, tuple(x_range), float(noise)
        # Splits draw from disjoint random streams even with equal seeds.
        self._split_key = zlib.crc32(split.encode())

    @property
    def examples_per_task(self) -> int:
        return self.shots + self.queries

    def describe(self) -> str:
        return f"{self.family} {self.shots}-shot, {self.queries} queries"

    def task_params(self, index: int, position: int) -> np.ndarray:
        """The task's two parameters (e.g. amplitude and phase) ``[2]``."""
        rng = np.random.default_rng([self.seed, self._split_key, index, position])
        return np.array([rng.uniform(lo, hi) for lo, hi in self.ranges])

    def _task(self, index: int, position: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self._split_key, index, position])
        params = np.array([rng.uniform(lo, hi) for lo, hi in self.ranges])
        x = rng.uniform(*self.x_range, size=self.shots + self.queries)
        y = self.fn(x, *params)
        if self.noise:
            y = y + self.noise * rng.standard_normal(y.shape)
        return x, y, params

    def function(self, params: np.ndarray | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The noise-free task function at ``x`` (for plots): ``params [2]``, ``x [...]``."""
        p = [float(v) for v in params]
        return torch.as_tensor(self.fn(x.double().numpy(), *p), dtype=x.dtype)

    def tasks(self, keys: list[tuple[int, int]]) -> TaskBatch:
        xs, ys, _ = zip(*(self._task(i, p) for i, p in keys))
        x = torch.from_numpy(np.stack(xs)).float().unsqueeze(-1)          # [T, S+Q, 1]
        y = torch.from_numpy(np.stack(ys)).float()                        # [T, S+Q]
        k = self.shots
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:], ways=0)

    def batch(self, index: int, rank: int = 0, world_size: int = 1) -> TaskBatch:
        return self.tasks([(index, p) for p in shard(self.tasks_per_batch, rank, world_size)])

    def episodes(self, ids) -> TaskBatch:
        """Fixed evaluation tasks: task ``e`` is position 0 of batch ``e``, whatever the chunking."""
        return self.tasks([(int(e), 0) for e in ids])

    def params_of(self, ids) -> torch.Tensor:
        """``[len(ids), 2]`` parameters of the evaluation tasks :meth:`episodes` returns."""
        return torch.tensor(np.stack([self._task(int(e), 0)[2] for e in ids]))
