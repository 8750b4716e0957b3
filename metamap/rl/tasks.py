"""The RL task kind: batches of tasks (parameters + seeds), not of labelled examples.

A meta-RL task's support set is the trajectories the *current* policy collects on it, so a
batch cannot be sampled before the learner runs. The sampler therefore hands out what *is*
fixed in advance -- each task's parameters (a goal, a goal velocity, a direction) and the key
that seeds its rollouts -- and the learner collects trajectories itself. Like every sampler,
batch ``i`` is a pure function of ``(seed, split, i, position)``: the same seed gives the same
tasks and rollouts, resuming needs only the step, and torch.distributed ranks draw their share.

Data sources: ``navigation2d``, ``cheetah-velocity``, ``cheetah-direction`` (``[data]`` keys:
``horizon``, ``oracle``).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from metamap.registry import DataInfo, options, register_data
from metamap.rl.envs import FAMILIES, TaskFamily, make_family
from metamap.tasks.sampler import check_positive, shard


@dataclass
class RLTaskBatch:
    """``params [T, task_dim]`` (float64) and the keys ``(index, position) [T, 2]`` that seed each task's
    rollouts, for ``split`` under ``seed``."""

    params: Tensor
    keys: Tensor
    seed: int
    split: str

    @property
    def num_tasks(self) -> int:
        return self.params.shape[0]

    def __len__(self) -> int:
        return self.num_tasks

    def slice(self, start: int, stop: int) -> RLTaskBatch:
        return RLTaskBatch(self.params[start:stop], self.keys[start:stop], self.seed, self.split)

    def task(self, i: int) -> RLTaskBatch:
        return self.slice(i, i + 1)

    def to(self, device=None, dtype=None, memory_format=None, non_blocking: bool = False) -> RLTaskBatch:
        return self                   # parameters stay on the CPU: the environments run there

    def pin_memory(self) -> RLTaskBatch:
        return self

    def seeds(self, phase: int) -> list[list[int]]:
        """Per-task integer lists seeding rollouts of ``phase`` (support step ``k``, the query, ...)."""
        split = zlib.crc32(self.split.encode())
        return [[self.seed, split, int(i), int(p), int(phase)] for i, p in self.keys.tolist()]

    def tasks(self) -> np.ndarray:
        return self.params.numpy()


class RLTaskSampler:
    """Meta-batches of ``tasks_per_batch`` tasks of one family (see the module docstring)."""

    regression = False

    def __init__(self, family: TaskFamily, tasks_per_batch: int = 1, seed: int = 0, split: str = "train"):
        check_positive(tasks_per_batch=tasks_per_batch)
        self.family, self.tasks_per_batch, self.seed, self.split = family, tasks_per_batch, int(seed), split
        self._split_key = zlib.crc32(split.encode())

    def describe(self) -> str:
        return f"{self.family.name} tasks, horizon {self.family.horizon}"

    def task_params(self, index: int, position: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self._split_key, index, position])
        return self.family.sample_tasks(rng, 1)[0]

    def tasks(self, keys: list[tuple[int, int]]) -> RLTaskBatch:
        params = torch.from_numpy(np.stack([self.task_params(i, p) for i, p in keys]))
        return RLTaskBatch(params, torch.tensor(keys, dtype=torch.long).reshape(-1, 2), self.seed, self.split)

    def batch(self, index: int, rank: int = 0, world_size: int = 1) -> RLTaskBatch:
        return self.tasks([(index, p) for p in shard(self.tasks_per_batch, rank, world_size)])

    def episodes(self, ids) -> RLTaskBatch:
        """Fixed evaluation tasks: task ``e`` is position 0 of batch ``e``, whatever the chunking."""
        return self.tasks([(int(e), 0) for e in ids])

    # -- the task kind's scoring (used by the evaluator) ----------------------------------------
    @staticmethod
    def score(learner, tasks: RLTaskBatch) -> dict[str, Tensor]:
        """Per-task returns ``[T]`` under each of the learner's metrics (after k adaptation steps,
        or in episode k of a trial)."""
        return learner.score_tasks(tasks)

    @staticmethod
    def direction(metric: str) -> str:
        return "max"                  # returns: higher is better


SOURCE_DEFAULTS = {"horizon": 0, "oracle": False}      # horizon 0 = the family's own (100 or 200)


def family_from_config(config: dict) -> TaskFamily:
    o = options(config["data"], SOURCE_DEFAULTS, "data")
    return make_family(config["data"]["name"], oracle=bool(o["oracle"]), horizon=o["horizon"] or None)


class RLSource:
    """``[data] name = "navigation2d" | "cheetah-velocity" | "cheetah-direction"``."""

    def info(self, config: dict) -> DataInfo:
        family = family_from_config(config)
        what = "oracle " if family.oracle else ""
        return DataInfo(example_shape=(family.policy_obs_dim,), problem="rl", output_dim=family.act_dim,
                        description=f"{what}{family.name} tasks (horizon {family.horizon})")

    def test_samplers(self, config: dict, split: str = "test") -> list[RLTaskSampler]:
        """One fixed set of test tasks (``eval.seed``); ways and shots mean nothing here."""
        return [RLTaskSampler(family_from_config(config), 1, config["eval"]["seed"], split)]

    def sampler(self, config: dict, split: str, ways: int, shots: int, queries: int, tasks_per_batch: int,
                seed: int) -> RLTaskSampler:
        """``ways``, ``shots`` and ``queries`` mean nothing for RL tasks and are ignored."""
        return RLTaskSampler(family_from_config(config), tasks_per_batch, seed, split)


for _name in FAMILIES:
    register_data(_name, defaults=SOURCE_DEFAULTS)(type(f"RLSource_{_name}", (RLSource,), {}))
