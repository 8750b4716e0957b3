"""The RL task kind: batches of tasks (parameters + seeds), not of labelled examples.

A meta-RL task's support set is the trajectories the *current* policy collects on it, so a
batch cannot be sampled before the learner runs. The sampler therefore hands out what *is*
fixed in advance -- each task's parameters (a goal, a goal velocity, a direction) and the key
that seeds its rollouts -- and the learner collects trajectories itself. Like every sampler,
batch ``i`` is a pure function of ``(seed, split, i, position)``: the same seed gives the same
tasks and rollouts, resuming needs only the step, and torch.distributed ranks draw their share.

Data sources: ``navigation2d``, ``cheetah-velocity``, ``cheetah-direction`` (``[data]`` keys:
``horizon``, ``oracle``); their task kind is ``rl``: metrics ``return_k``, the mean return of a
test task's episodes after ``k`` adaptation steps (policy-gradient learners) or in episode
``k + 1`` of a trial (RL², i.e. after ``k`` episodes of experience), ``k = 0..3``, higher is
better; ``return_1`` chooses the best checkpoint.

The kind's ``collect`` hands the batch over unchanged: MAML's support and query trajectories are
collected in turn, with an adaptation step between them that only the learner knows, so the
learner collects in ``meta_backward`` (training) and ``score_tasks`` (evaluation).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from metamap.data.sources import DataSource
from metamap.options import ARCHITECTURE, Options, option
from metamap.registry import DataInfo, register_data, register_task_kind, section_options, task_kind
from metamap.rl.envs import FAMILIES, TaskFamily, make_family
from metamap.tasks.kinds import Metric, TaskKind
from metamap.tasks.sampler import check_positive, shard

ADAPTATION_STEPS = 3          # return_0 .. return_3


@register_task_kind("rl")
class Reinforcement(TaskKind):
    """Tasks an agent acts in; scored by its returns after 0..3 adaptation steps (or episodes)."""

    metrics = tuple(Metric(f"return_{k}", higher_is_better=True) for k in (1, 0, 2, 3))
    progress = ("kl", "entropy", "env_steps_per_s")

    def loss(self, outputs, targets):
        raise NotImplementedError("RL tasks have no labelled targets; the learner computes its own objective")

    def evaluate(self, learner, tasks) -> dict[str, Tensor]:
        """The learner acts in each task (collecting and adapting as it does): ``return_k -> [T]``."""
        return learner.score_tasks(tasks)


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

    # Sizes evaluation chunks: a test task runs about 40 trajectories per adaptation step, so
    # the evaluator takes 50 tasks at a time.
    examples_per_task = 40

    def __init__(self, family: TaskFamily, tasks_per_batch: int = 1, seed: int = 0, split: str = "train"):
        check_positive(tasks_per_batch=tasks_per_batch)
        self.family, self.tasks_per_batch, self.seed, self.split = family, tasks_per_batch, int(seed), split
        self._split_key = zlib.crc32(split.encode())
        self.kind = task_kind("rl")

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


@dataclass(frozen=True, kw_only=True)
class RLSourceOptions(Options):
    section = "data"
    horizon: int = option(0, low=0, high=1_000_000, role=ARCHITECTURE, doc="steps per episode; 0 = the family's own")
    oracle: bool = option(False, role=ARCHITECTURE, doc="the task's parameters in the observation")


def family_from_config(config: dict) -> TaskFamily:
    o: RLSourceOptions = section_options(config, "data")
    return make_family(config["data"]["name"], oracle=o.oracle, horizon=o.horizon or None)


class RLSource(DataSource):
    """``[data] name = "navigation2d" | "cheetah-velocity" | "cheetah-direction"``."""

    def info(self, config: dict) -> DataInfo:
        family = family_from_config(config)
        what = "oracle " if family.oracle else ""
        return DataInfo(example_shape=(family.policy_obs_dim,), problem="rl", output_dim=family.act_dim,
                        description=f"{what}{family.name} tasks (horizon {family.horizon})")

    def describe(self, config: dict, split: str) -> str:
        family = family_from_config(config)
        return (f"{family.name} {split} tasks (drawn from the task distribution with the {split} split's own "
                f"random stream)")

    def sampler(self, config: dict, split: str, ways: int, shots: int, queries: int, tasks_per_batch: int,
                seed: int) -> RLTaskSampler:
        """``ways``, ``shots`` and ``queries`` mean nothing for RL tasks and are ignored."""
        return RLTaskSampler(family_from_config(config), tasks_per_batch, seed, split)


for _name in FAMILIES:
    register_data(_name, options=RLSourceOptions)(type(f"RLSource_{_name}", (RLSource,), {}))
