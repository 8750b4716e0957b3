"""Meta-RL learners on the one MetaLearner interface: MAML-TRPO, first-order MAML, MAML with a
ProMP-style clipped outer step, RL², and the baselines (pre-trained, random initialisation, oracle).

Each learner collects its own trajectories (the support set of an RL task is what the current
policy does on it) from the task parameters and seeds of an :class:`RLTaskBatch`, and computes
its own outer update in ``meta_backward``:

* TRPO (``outer = "trpo"``) finds a line-searched step ``theta_new`` itself and hands the trainer
  the direction ``theta - theta_new`` with ``optim.name = "sgd"``, ``optim.lr = 1`` (the learner's
  defaults), so the trainer's step lands exactly on ``theta_new``. One step per meta-batch:
  chunking a meta-batch (``train.chunk_tasks``) is refused.
* PPO (RL², ``outer = "ppo"``) takes several minibatch steps per batch with the trainer's own
  optimizer (Adam), whose moments the trainer checkpoints.

Evaluation (``score_tasks``, the ``rl`` task kind's metrics): ``return_k``, the mean return of
``eval_trajectories`` episodes per test task after ``k = 0..3`` policy-gradient steps (MAML,
pre-trained, random; step sizes ``inner_lr`` then ``eval_lr_factor * inner_lr``), or of episode
``k + 1`` of a four-episode trial (RL²). The oracle does not adapt: every ``return_k`` is the
return of its one set of episodes. Higher is better.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from metamap.algorithms.base import MetaLearner
from metamap.errors import ConfigError
from metamap.options import ADAPTATION, ARCHITECTURE, MAX_STEP, TRAINING, Options, option
from metamap.registry import DataInfo, register_learner, section_options
from metamap.rl.maml import PGConfig, PolicyGradientMeta
from metamap.rl.policies import GaussianMLPPolicy, RecurrentPolicy
from metamap.rl.rl2 import RL2, RL2Config
from metamap.rl.tasks import ADAPTATION_STEPS, RLTaskBatch, family_from_config


def trainer_optimizer(grad, name: str):
    optimizer = getattr(grad, "optimizer", None)
    if optimizer is None:
        raise ConfigError(f"{name} takes several optimizer steps per batch (PPO epochs) and needs the "
                          "trainer's optimizer in meta_backward")
    return optimizer


class RLLearner(MetaLearner):
    """Shared parts of the meta-RL learners: collecting, scoring, refusing a split meta-batch."""

    family = "reinforcement"
    adapts_with_gradients = True

    def __init__(self, env_family, obs_dim: int):
        super().__init__(example_dims=1)
        self.env_family = env_family
        self.obs_dim = obs_dim

    def _whole_batch(self, grad) -> None:
        if abs(getattr(grad, "weight", 1.0) - 1.0) > 1e-12:
            raise ConfigError(f"{self.name} takes one outer step per meta-batch and cannot split it into "
                              "chunks; set train.chunk_tasks = 0 (or auto)")

    def score_tasks(self, tasks: RLTaskBatch) -> dict[str, Tensor]:
        """``return_k -> [T]`` for ``k = 0..3`` (see the module docstring)."""
        raise NotImplementedError

    def meta_loss(self, tasks: RLTaskBatch):
        raise ConfigError(f"{self.name} computes its outer update in meta_backward; "
                          "train it with the metamap trainer (metamap train)")


class PolicyGradientLearner(RLLearner):
    """MAML-RL and its relatives on a Gaussian MLP policy (see :mod:`metamap.rl.maml`)."""

    name = "maml-trpo"

    def __init__(self, env_family, cfg: PGConfig, hidden=(100, 100), activation: str = "relu",
                 adapt_at_test: bool = True, eval_trajectories: int = 40, policy=None):
        super().__init__(env_family, env_family.policy_obs_dim)
        self.policy = policy if policy is not None else GaussianMLPPolicy(
            env_family.policy_obs_dim, env_family.act_dim, tuple(hidden), activation)
        self.cfg, self.adapt_at_test, self.eval_trajectories = cfg, bool(adapt_at_test), eval_trajectories
        self.meta = PolicyGradientMeta(self.policy, env_family, cfg)

    def preferred_chunk(self) -> int:
        return 0

    def meta_backward(self, tasks: RLTaskBatch, grad) -> tuple[Tensor, dict[str, float]]:
        self._whole_batch(grad)
        t0 = time.perf_counter()
        batch = self.meta.collect(tasks.tasks(), tasks.seeds)
        sampled = time.perf_counter() - t0
        if self.cfg.outer == "trpo":
            old = [p.detach().clone() for p in self.policy.parameters()]
            stats = self.meta.trpo_update(batch)
            loss, kl = stats.loss_after, stats.kl
            for p, before in zip(self.policy.parameters(), old):
                new = p.detach().clone()
                with torch.no_grad():
                    p.copy_(before)
                grad.add(p, before - new)     # with sgd, lr 1: the trainer's step lands on `new`
        else:
            loss, kl = self._ppo_outer(batch, grad)
        # return_0: the support episodes (before adaptation); return_1: the query episodes (after).
        return torch.tensor(loss), {
            "return_0": batch.stats["return_pre"], "return_1": batch.stats["return"], "kl": kl,
            "entropy": self.meta.entropy(), "env_steps": batch.stats["env_steps"],
            "env_steps_per_s": batch.stats["env_steps"] / max(sampled, 1e-9)}

    def _ppo_outer(self, batch, grad) -> tuple[float, float]:
        """ProMP-style outer step: ``ppo_epochs`` steps of the trainer's optimizer (Adam) on the
        clipped surrogate of the query episodes, through the inner step."""
        c = self.cfg
        opt = trainer_optimizer(grad, self.name)
        loss_fn, kl_fn = self.meta.objectives(batch, clip=c.ppo_clip)
        params = list(self.policy.parameters())
        loss = torch.zeros(())
        for _ in range(c.ppo_epochs):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(params)
            loss.backward()
            opt.step()
        for p in params:
            p.grad = None                     # the steps are taken; the trainer's own step is a no-op
        kl = float(kl_fn([p.detach() for p in params]))
        return float(loss.detach()), kl

    def score_tasks(self, tasks: RLTaskBatch) -> dict[str, Tensor]:
        steps = ADAPTATION_STEPS if self.adapt_at_test else 0
        returns = self.meta.adaptation_returns(tasks.tasks(), tasks.seeds, steps, self.eval_trajectories)
        return {f"return_{k}": returns[min(k, steps)] for k in range(ADAPTATION_STEPS + 1)}


class RL2Learner(RLLearner):
    """RL² with PPO (see :mod:`metamap.rl.rl2`)."""

    name = "rl2"

    def __init__(self, env_family, cfg: RL2Config, hidden: int = 64, eval_trajectories: int = 40, policy=None):
        super().__init__(env_family, env_family.policy_obs_dim)
        self.policy = policy if policy is not None else RecurrentPolicy(
            env_family.policy_obs_dim, env_family.act_dim, hidden)
        self.cfg, self.eval_trajectories = cfg, eval_trajectories
        self.rl2 = RL2(self.policy, env_family, cfg)

    def preferred_chunk(self) -> int:
        return 0

    def meta_backward(self, tasks: RLTaskBatch, grad) -> tuple[Tensor, dict[str, float]]:
        self._whole_batch(grad)
        optimizer = trainer_optimizer(grad, self.name)
        t0 = time.perf_counter()
        trials = self.rl2.collect(tasks.tasks(), tasks.seeds(0))
        sampled = time.perf_counter() - t0
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence(tasks.seeds(1)[0]).generate_state(1)[0]))
        stats = self.rl2.ppo_update(optimizer, trials, gen)
        for p in self.policy.parameters():
            p.grad = None                     # the steps are taken; the trainer's own step is a no-op
        per_episode = trials.episode_returns().mean((0, 1))
        record = {"return": float(trials.episode_returns().mean()), "kl": stats["kl"], "entropy": stats["entropy"],
                  "value_loss": stats["value_loss"], "env_steps": trials.steps,
                  "env_steps_per_s": trials.steps / max(sampled, 1e-9)}
        record.update({f"return_{k}": float(v) for k, v in enumerate(per_episode)})    # episode k + 1
        return torch.tensor(stats["policy_loss"]), record

    def score_tasks(self, tasks: RLTaskBatch) -> dict[str, Tensor]:
        trials = self.rl2.collect(tasks.tasks(), tasks.seeds(0), ADAPTATION_STEPS + 1, self.eval_trajectories)
        per = trials.episode_returns().mean(1).double()          # [T, episodes]
        return {f"return_{k}": per[:, k] for k in range(ADAPTATION_STEPS + 1)}


# -- registration -----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class PGOptions(Options):
    """Options of the policy-gradient meta-learners (MAML-TRPO and its baselines)."""

    section = "learner"
    inner_steps: int = option(1, low=0, high=1000, role=TRAINING, doc="policy-gradient steps per task")
    inner_lr: float = option(0.1, low=0, low_open=True, high=MAX_STEP, role=ADAPTATION, doc="inner step size")
    eval_lr_factor: float = option(0.5, low=0, low_open=True, role=ADAPTATION,
                                   doc="test-time inner step size = inner_lr times this")
    first_order: bool = option(False, role=TRAINING)
    estimator: Literal["paper", "lvc"] = option("paper", role=TRAINING, doc="inner gradient estimator")
    trajectories: int = option(20, low=1, high=100_000, role=TRAINING, doc="trajectories per task and step")
    discount: float = option(0.99, low=0, high=1, role=TRAINING)
    gae_lambda: float = option(1.0, low=0, high=1, role=TRAINING)
    normalize_advantages: bool = option(True, role=TRAINING)
    outer: Literal["trpo", "ppo"] = option("trpo", role=TRAINING, doc="the outer step")
    max_kl: float = option(0.01, low=0, low_open=True, role=TRAINING)
    cg_iterations: int = option(10, low=1, high=10_000, role=TRAINING)
    cg_damping: float = option(1e-5, low=0, role=TRAINING)
    backtrack_ratio: float = option(0.8, low=0, high=1, low_open=True, high_open=True, role=TRAINING)
    max_backtracks: int = option(15, low=0, high=10_000, role=TRAINING)
    curvature_tasks: float = option(1.0, low=0, high=1, low_open=True, role=TRAINING,
                                    doc="share of the tasks the curvature is estimated on")
    ppo_clip: float = option(0.2, low=0, low_open=True, role=TRAINING)
    ppo_epochs: int = option(5, low=1, high=10_000, role=TRAINING)
    hidden: list[int] = option([100, 100], low=1, high=1 << 16, role=ARCHITECTURE, doc="policy hidden layers")
    activation: Literal["relu", "tanh"] = option("relu", role=ARCHITECTURE)
    adapt_at_test: bool = option(True, role=ADAPTATION)
    eval_trajectories: int = option(40, low=1, high=100_000, role=ADAPTATION)


@dataclass(frozen=True, kw_only=True)
class RL2Options(Options):
    section = "learner"
    episodes: int = option(2, low=1, high=1000, role=TRAINING, doc="episodes per trial")
    trajectories: int = option(10, low=1, high=100_000, role=TRAINING)
    discount: float = option(0.99, low=0, high=1, role=TRAINING)
    gae_lambda: float = option(0.95, low=0, high=1, role=TRAINING)
    ppo_clip: float = option(0.2, low=0, low_open=True, role=TRAINING)
    ppo_epochs: int = option(5, low=1, high=10_000, role=TRAINING)
    minibatches: int = option(4, low=1, high=10_000, role=TRAINING)
    value_coef: float = option(0.5, low=0, role=TRAINING)
    entropy_coef: float = option(0.0, low=0, role=TRAINING)
    hidden: int = option(64, low=1, high=1 << 16, role=ARCHITECTURE, doc="GRU units")
    eval_trajectories: int = option(40, low=1, high=100_000, role=ADAPTATION)


# The authors' 2-D navigation run: meta-batch 20 tasks (paper; their script used 40), 100 meta-iterations.
RL_DEFAULTS = {"episode": {"tasks_per_batch": 20},
               "train": {"steps": 100, "log_every": 1, "val_every": 0, "checkpoint_every": 5, "chunk_tasks": 0,
                         "report": False},
               # RL tasks have no classes or shots: one evaluation setting.
               "eval": {"episodes": 600, "seed": 2024, "ways": [1], "shots": [1]}}
TRPO_OPTIM = {"optim": {"name": "sgd", "lr": 1.0, "momentum": 0.0, "weight_decay": 0.0},
              "schedule": {"name": "constant"}}


def _check_rl(config: dict, info: DataInfo) -> None:
    if info.problem != "rl":
        raise ConfigError(f"learner {config['learner']['name']} needs an RL task family, not "
                          f"{config['data']['name']!r}: use --data navigation2d, cheetah-velocity or "
                          "cheetah-direction")


def pg_learner(family, o: PGOptions, policy=None) -> PolicyGradientLearner:
    """A policy-gradient learner for ``family`` with the checked options ``o`` (``policy``: one
    given, else the Gaussian MLP that ``hidden`` and ``activation`` describe)."""
    d = o.to_dict()
    cfg = PGConfig(**{k: v for k, v in d.items() if k in PGConfig.__dataclass_fields__})
    return PolicyGradientLearner(family, cfg, d["hidden"], d["activation"], d["adapt_at_test"],
                                 d["eval_trajectories"], policy)


def rl2_learner(family, o: RL2Options, policy=None) -> RL2Learner:
    """An RL² learner for ``family`` with the checked options ``o`` (``policy``: a
    :class:`RecurrentPolicy` given, else one of ``hidden`` GRU units)."""
    d = o.to_dict()
    cfg = RL2Config(**{k: v for k, v in d.items() if k in RL2Config.__dataclass_fields__})
    return RL2Learner(family, cfg, d["hidden"], d["eval_trajectories"], policy)


def build_pg(config: dict, info: DataInfo) -> PolicyGradientLearner:
    _check_rl(config, info)
    return pg_learner(family_from_config(config), section_options(config, "learner"))


def build_rl2(config: dict, info: DataInfo) -> RL2Learner:
    _check_rl(config, info)
    return rl2_learner(family_from_config(config), section_options(config, "learner"))


def _register_pg(name: str, summary: str, extra: dict | None = None, **learner):
    defaults = {**RL_DEFAULTS, **TRPO_OPTIM, **(extra or {})}
    defaults = {k: dict(v) if isinstance(v, dict) else v for k, v in defaults.items()}
    options = PGOptions.with_defaults(f"PGOptions_{name.replace('-', '_')}", **learner) if learner else PGOptions

    @register_learner(name, options=options, defaults=defaults, family="reinforcement", summary=summary)
    def _build(config: dict, info: DataInfo):
        learner = build_pg(config, info)
        learner.name = name
        return learner


_register_pg("maml-trpo", "MAML for RL: policy-gradient inner step, TRPO outer step (Finn et al. 2017)")
_register_pg("fomaml-trpo", "first-order MAML for RL (TRPO outer step)", first_order=True)
_register_pg("pretrained", "baseline: one policy trained by TRPO on all tasks jointly, fine-tuned by "
             "policy gradient at test time", inner_steps=0)
_register_pg("random", "baseline: a randomly initialised policy fine-tuned by policy gradient (no training)",
             {"train": {**RL_DEFAULTS["train"], "steps": 0}}, inner_steps=0)
_register_pg("oracle", "baseline: TRPO on all tasks with the task's parameters in the observation",
             {"data": {"oracle": True}}, inner_steps=0, adapt_at_test=False)
_register_pg("maml-promp", "MAML for RL with a ProMP-style outer step: Adam on the clipped surrogate, "
             "low-variance-curvature inner estimator (Rothfuss et al. 2019)",
             {"optim": {"name": "adam", "lr": 1e-3}, "schedule": {"name": "constant"}},
             outer="ppo", estimator="lvc")


# RL²: 10 tasks x 10 two-episode trials per batch, Adam 3e-3 (chosen on 2-D navigation training tasks in a
# short sweep: 1e-3 with a value head sharing the GRU barely moved in 100 batches).
@register_learner("rl2", options=RL2Options, defaults={**RL_DEFAULTS, "optim": {"name": "adam", "lr": 3e-3},
                                                       "schedule": {"name": "constant"},
                                                       "episode": {"tasks_per_batch": 10},
                                                       "train": {**RL_DEFAULTS["train"], "steps": 150}},
                  family="reinforcement", summary="RL²: a GRU policy remembering a task's episodes, PPO (Duan et al. 2016)")
def _build_rl2(config: dict, info: DataInfo):
    return build_rl2(config, info)
