"""Optimization-based meta-learners: MAML, first-order MAML, ANIL, Meta-SGD (and MAML++ options).

All adapt a network ``body -> head`` to each task with a few gradient steps on its support set,
through the one inner loop of :mod:`metamap.algorithms.inner_loop`, and differ only in options:

=============  ===========================================================================
MAML           second order: the meta-gradient flows through the inner updates (Finn et al. 2017)
first-order    ``first_order = true``: inner gradients are constants (FOMAML)
ANIL           ``adapt = "head"``: only the head adapts; the body is meta-learned (Raghu et al. 2020)
Meta-SGD       ``step_sizes = "per_element"``: a learned step size per weight (Li et al. 2017)
MAML++         ``step_sizes = "per_layer_per_step"`` and ``multi_step_loss`` (Antoniou et al. 2019)
Reptile        the outer update is ``theta - mean_t phi_t`` (:class:`Reptile`, Nichol et al. 2018)
=============  ===========================================================================

The inner step is an inner optimizer object (:mod:`metamap.algorithms.inner_opt`: SGD, learned
step sizes, Adam) and which weights adapt is a declared :class:`ParameterSplit`.

``zero_head = true`` is Kao et al.'s (ICLR 2022) zeroing trick: the head's weights and bias are
zero at initialisation and are set back to zero after every outer step, so every task starts
from a head that favours no class and the inner steps alone build it from the support set.

Batch norm inside the inner loop (``bn``): ``"transductive"`` (default, as the reference MAML)
normalises each task's support and query sets with their own batch statistics, at training
and at test time; ``"running"`` does so in meta-training while tracking running statistics
(from the query sets), and normalises with those running statistics at evaluation.
``transductive = false`` (with ``bn = "transductive"``) is Reptile's non-transductive
evaluation: each query is classified in a batch made of the support set and that query alone,
so no query's statistics reach another's prediction.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from metamap.algorithms.base import MetaGradient, MetaLearner, Predictor
from metamap.algorithms.inner_loop import inner_loop, minibatch_indices
from metamap.algorithms.inner_opt import build_inner_optimizer
from metamap.algorithms.split import ParameterSplit
from metamap.errors import ConfigError, MetamapError
from metamap.nets.backend import BackendOptions, make_backend
from metamap.nets.functional import BN_MODES
from metamap.options import ADAPTATION, ARCHITECTURE, MAX_STEP, RUNTIME, TRAINING, Options, option
from metamap.registry import DataInfo, build_backbone, register_learner, section_options, task_kind
from metamap.tasks.batch import TaskBatch


def msl_weights(steps: int, progress: float) -> Tensor:
    """MAML++ multi-step loss weights ``[steps]`` (for the query loss after each inner step).

    Uniform at the start; over ``progress`` 0 -> 1 the non-final weights fall linearly to
    ``0.03 / steps`` and the final one takes up the rest, as in Antoniou et al. (2019).
    """
    if steps <= 1:
        return torch.ones(max(steps, 1))
    floor = 0.03 / steps
    p = min(max(progress, 0.0), 1.0)
    other = 1.0 / steps + p * (floor - 1.0 / steps)
    w = torch.full((steps,), other)
    w[-1] = 1.0 - other * (steps - 1)
    return w


class GradientLearner(MetaLearner):
    """A network ``model = Sequential(body, head)`` adapted to each task by gradient descent.

    Inputs ``[T, N, *example]``; the predictor returns ``[T, Q, ways]`` logits (classification)
    or ``[T, Q, out_dim]`` (regression). See the module docstring for the options.
    """

    name = "maml"
    family = "optimization"
    adapts_with_gradients = True

    # Checkpoints written before the inner optimizer objects kept learned step sizes here.
    renamed_state = {"step_sizes.sizes.": "inner_optimizer.sizes."}

    def __init__(self, body: nn.Module, head: nn.Module, example_dims: int, *, ways: int = 0,
                 inner_steps: int = 1, inner_steps_eval: int = 1, inner_lr: float = 0.4,
                 first_order: bool = False, step_sizes: str = "fixed", inner_optimizer: str = "sgd",
                 inner_beta1: float = 0.0, inner_beta2: float = 0.999, inner_eps: float = 1e-8,
                 inner_state: str = "reset", inner_batch: int = 0, inner_batch_eval: int = 0,
                 adapt: str | list = "all", freeze: list | tuple = (),
                 bn: str = "transductive", multi_step_loss: bool = False, msl_anneal_steps: int = 0,
                 backend: str = "fast", channels_last: bool = True, fuse_bn_pool: bool = True,
                 fold_bn: bool = True, cpp_kernels: bool = True, grad_checkpoint: bool = False, seed: int = 0,
                 zero_head: bool = False, transductive: bool = True):
        super().__init__(example_dims)
        for what, v in (("inner_steps", inner_steps), ("inner_steps_eval", inner_steps_eval),
                        ("inner_batch", inner_batch), ("inner_batch_eval", inner_batch_eval)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"learner.{what} must be a whole number >= 0, not {v!r}")
        if bn not in BN_MODES:
            raise ConfigError(f"learner.bn must be one of {', '.join(BN_MODES)}, not {bn!r}")
        self.model = nn.Sequential(OrderedDict(body=body, head=head))
        self.ways, self.inner_steps, self.inner_steps_eval = ways, inner_steps, inner_steps_eval
        self.first_order, self.bn = bool(first_order), bn
        self.multi_step_loss, self.msl_anneal_steps = bool(multi_step_loss), int(msl_anneal_steps)
        self.grad_checkpoint, self.seed = bool(grad_checkpoint), int(seed)
        self.inner_batch, self.inner_batch_eval = inner_batch, inner_batch_eval
        self._said: set[tuple] = set()      # the mini-batch sizes already reported as clamped
        if not isinstance(zero_head, bool):
            raise ConfigError(f"learner.zero_head must be true or false, not {zero_head!r}")
        if not isinstance(transductive, bool):
            raise ConfigError(f"learner.transductive must be true or false, not {transductive!r}")
        self.zero_head, self.transductive = zero_head, transductive
        if zero_head:
            self._zero_head()
        self.split = ParameterSplit.declare(self.model, adapt, freeze)
        if not self.split.adapted and max(inner_steps, inner_steps_eval) > 0:
            raise ConfigError(f"learner.adapt = {adapt!r} selects no trainable parameter to adapt")
        for n in self.split.frozen:
            self.model.get_parameter(n).requires_grad_(False)
        shapes = {n: self.model.get_parameter(n).shape for n in self.split.adapted}
        self.inner_optimizer = build_inner_optimizer(inner_optimizer, step_sizes, inner_lr, shapes, inner_steps,
                                                     inner_beta1, inner_beta2, inner_eps, inner_state)
        # Outer steps taken so far: drives the multi-step-loss annealing and survives checkpoints.
        self.register_buffer("outer_steps", torch.zeros((), dtype=torch.long))
        # When the body does not adapt (ANIL), its features are computed once per task batch, as
        # one large batch, and only the head runs in the inner loop.
        self.body_adapts = self.split.adapts("body")
        options = BackendOptions(backend, channels_last, fuse_bn_pool, fold_bn, cpp_kernels)
        self.full = make_backend(self.model, "", bn, options)
        self.body_fn = make_backend(self.model, "body", bn, options)
        self.head_fn = make_backend(self.model, "head", bn, options)

    @property
    def adapt_names(self) -> list[str]:
        return list(self.split.adapted)

    @contextlib.contextmanager
    def running_on(self, options: BackendOptions):
        """Run the network on the backend ``options`` asks for, inside the block (the levers change
        how the function is computed, not what it is: ``metamap export`` traces with them off)."""
        saved = self.full, self.body_fn, self.head_fn
        self.full, self.body_fn, self.head_fn = (make_backend(self.model, part, self.bn, options)
                                                 for part in ("", "body", "head"))
        try:
            yield
        finally:
            self.full, self.body_fn, self.head_fn = saved

    # -- adaptation ------------------------------------------------------------------------------
    def steps(self) -> int:
        return self.inner_steps if self.training else self.inner_steps_eval

    def _adapt(self, support_x: Tensor, support_y: Tensor, steps: int, differentiable: bool):
        """-> (list of parameter dicts after 0..steps steps, query forward ``(params, x) -> out``)."""
        training = self.training
        theta = dict(self.model.named_parameters())
        batches = None
        batch = self.inner_batch if training else self.inner_batch_eval
        if batch and steps:
            batches = minibatch_indices(support_x, self._mini_batch(batch, support_x.shape[1], training), steps,
                                        self.seed)
        # Meta-training adaptations hand their final optimizer state on (Adam carried across tasks).
        done = (lambda state: self.inner_optimizer.commit(self.adapt_names, state)) if training else None
        loop = dict(optimizer=self.inner_optimizer, differentiable=differentiable, second_order=not self.first_order,
                    recompute=self.grad_checkpoint, loss=self.task_kind(support_y).loss, batches=batches,
                    on_done=done)
        if self.body_adapts:
            def fwd(p, x, record=None):
                return self.full(p, x, training, record)
            return inner_loop(fwd, theta, self.adapt_names, support_x, support_y, steps, **loop), fwd
        # Frozen body: features once for the support set; the inner loop runs on the head alone.
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            fs = self.body_fn(theta, support_x, training)
        history = inner_loop(lambda p, x: self.head_fn(p, x, training), theta, self.adapt_names, fs, support_y,
                             steps, **loop)

        def fwd(p, x, record=None):
            return self.head_fn(p, self.body_fn(p, x, training, record), training)
        return history, fwd

    def _mini_batch(self, batch: int, support: int, training: bool) -> int:
        """An inner mini-batch is a subset of the support set: one larger than it is the whole set.

        (Dealing ``batch > support`` examples would repeat some, weighting them more than the others
        by chance, at ``batch / support`` times the memory.) Said once per learner and size."""
        if batch <= support:
            return batch
        key = ("inner_batch" if training else "inner_batch_eval", batch, support)
        if key not in self._said:
            self._said.add(key)
            warnings.warn(f"learner.{key[0]} = {batch} is more than the {support} support examples of a task: "
                          f"each inner step uses all {support} (a mini-batch holds each example once); set "
                          f"learner.{key[0]} <= {support} or 0 to say so", stacklevel=4)
        return support

    def _check_ways(self, support_y: Tensor, ways: int) -> None:
        if self.task_kind(support_y).classes and ways != self.ways:
            raise MetamapError(
                f"this {self.name} learner's head has {self.ways} outputs, so it adapts to {self.ways}-way "
                f"tasks only, not {ways}-way; train and evaluate with the same number of ways "
                f"(e.g. eval.ways = [{self.ways}])")

    def adapt_tasks(self, support_x: Tensor, support_y: Tensor, ways: int, steps: int | None = None
                    ) -> Predictor:
        """Adapt to ``support_x [T, S, ...]``; ``steps`` overrides the number of inner steps."""
        self._check_ways(support_y, ways)
        differentiable = self.training and torch.is_grad_enabled()
        history, fwd = self._adapt(support_x, support_y, self.steps() if steps is None else steps,
                                   differentiable)
        final = history[-1]
        if not differentiable:
            # Evaluation: the predictor holds plain tensors (no autograd leaves), so that it can be
            # traced into a standalone graph (metamap export) with the adapted weights as constants.
            final = {n: v.detach() for n, v in final.items()}
        if not (self.transductive or self.training) and self.bn == "transductive":
            return lambda query_x: self._query_with_support(fwd, final, support_x, query_x)

        def predict(query_x: Tensor) -> Tensor:
            with torch.set_grad_enabled(differentiable):
                return fwd(final, query_x)
        return predict

    def _query_with_support(self, fwd, params: dict[str, Tensor], support_x: Tensor, query_x: Tensor) -> Tensor:
        """Non-transductive predictions ``[T, Q, ...]``: query ``j`` of task ``t`` runs in the batch
        ``support_x[t] + [query_x[t, j]]`` (as T*Q tasks of S+1 examples) and keeps its own output."""
        t, q = query_x.shape[:2]
        support = support_x.unsqueeze(1).expand(t, q, *support_x.shape[1:])
        batch = torch.cat([support, query_x.unsqueeze(2)], 2).flatten(0, 1)            # [T*Q, S+1, ...]
        per_task = {n: v.repeat_interleave(q, 0) if v.dim() == self.model.get_parameter(n).dim() + 1 else v
                    for n, v in params.items()}
        with torch.no_grad():
            out = fwd(per_task, batch)[:, -1]
        return out.reshape(t, q, *out.shape[1:])

    def finetune_loss(self, support_x: Tensor, support_y: Tensor, pseudo_x: Tensor, ways: int,
                      state: object) -> Tensor:
        # Test-time fine-tuning moves the initial weights themselves on the augmented support set;
        # the usual inner steps then adapt from the fine-tuned weights (finetuned_predictor).
        self._check_ways(support_y, ways)
        history, fwd = self._adapt(support_x, support_y, 0, True)
        return self.query_loss(fwd(history[0], pseudo_x), support_y)

    def adapt_trajectory(self, support_x: Tensor, support_y: Tensor, steps: int, ways: int = 0
                         ) -> list[Predictor]:
        """Predictors after ``0, 1, ..., steps`` inner steps (for plots and step sweeps)."""
        self._check_ways(support_y, ways or self.ways)
        history, fwd = self._adapt(support_x, support_y, steps, False)

        def make(p):
            def predict(query_x: Tensor) -> Tensor:
                with torch.no_grad():
                    return fwd(p, query_x)
            return predict
        return [make(p) for p in history]

    # -- meta-training ---------------------------------------------------------------------------
    def meta_loss(self, tasks: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        self._check_ways(tasks.support_y, tasks.ways)
        differentiable = self.training and torch.is_grad_enabled()
        steps = self.steps()
        history, fwd = self._adapt(tasks.support_x, tasks.support_y, steps, differentiable)
        record: dict | None = {} if self.training and self.bn == "running" else None
        if self.training and self.multi_step_loss and steps > 1:
            progress = float(self.outer_steps) / max(self.msl_anneal_steps, 1)
            weights = msl_weights(steps, progress if self.msl_anneal_steps else 1.0)
            loss = torch.zeros(())
            for k in range(1, steps + 1):
                outputs = self._query(fwd, history[k], tasks.query_x, record if k == steps else None)
                loss = loss + weights[k - 1] * self.query_loss(outputs, tasks.query_y)
        else:
            outputs = self._query(fwd, history[-1], tasks.query_x, record)
            loss = self.query_loss(outputs, tasks.query_y)
        if record:
            self._update_running_stats(record)
        return loss, self.task_metrics(outputs.detach(), tasks.query_y)

    def _query(self, fwd, params: dict[str, Tensor], query_x: Tensor, record: dict | None) -> Tensor:
        """The query forward pass; with ``grad_checkpoint`` its activations are recomputed in the
        backward pass instead of kept (the query set is most of a task's examples)."""
        if not (self.grad_checkpoint and self.training and torch.is_grad_enabled()):
            return fwd(params, query_x, record)
        names = list(params)
        return checkpoint(lambda *p: fwd(dict(zip(names, p)), query_x, record), *params.values(),
                          use_reentrant=False)

    def preferred_chunk(self) -> int:
        # Per-task convolutions: chunks of 8 tasks were faster than all 32 at once on a 2-core
        # CPU (a working set nearer the caches) and than chunks of 2 once the first layer ran in
        # C++ (1.16x at five inner steps; BENCHMARKS.md, speed run G), at a third of the whole
        # batch's memory. Small MLPs (regression) are the opposite: per-pass overhead dominates,
        # and two-task chunks ran 5x slower than the whole meta-batch.
        convolutional = any(isinstance(m, nn.Conv2d) for m in self.model.modules())
        return 8 if convolutional and self.body_adapts and self.full.name == "fast" else 0

    def after_step(self) -> None:
        self.outer_steps += 1
        if self.zero_head:
            self._zero_head()

    def _zero_head(self) -> None:
        with torch.no_grad():
            for p in self.model.head.parameters():
                p.zero_()

    def _update_running_stats(self, record: dict) -> None:
        with torch.no_grad():
            for name, (mean, var) in record.items():      # keys: module names in self.model
                m = self.model.get_submodule(name)
                momentum = 0.1 if m.momentum is None else m.momentum
                m.running_mean.lerp_(mean, momentum)
                if var is not None:
                    m.running_var.lerp_(var, momentum)
                m.num_batches_tracked += 1


class Reptile(GradientLearner):
    """Reptile (Nichol, Achiam & Schulman, 2018): move the initial weights toward the adapted ones.

    Its meta-gradient is the parameter difference ``theta - mean_t phi_t`` (``phi_t`` the weights
    after ``inner_steps`` inner steps on task ``t``'s support set), written directly by
    :meth:`meta_backward`, not the gradient of a loss. The trainer's outer optimizer applies it:
    with ``optim.name = "sgd"`` and ``optim.lr = epsilon`` that is exactly Reptile's update
    ``theta += epsilon * (mean_t phi_t - theta)`` -- the *batched* version for a meta-batch of
    tasks, the *serial* one with ``episode.tasks_per_batch = 1``. (With Adam it is Reptile with
    an Adam outer step.) The reported loss and metrics are the query scores after adaptation.
    """

    name = "reptile"

    def _adapted(self, tasks: TaskBatch):
        self._check_ways(tasks.support_y, tasks.ways)
        history, fwd = self._adapt(tasks.support_x, tasks.support_y, self.steps(), False)
        final = history[-1]
        with torch.no_grad():
            outputs = fwd(final, tasks.query_x)
        return final, self.query_loss(outputs, tasks.query_y), self.task_metrics(outputs, tasks.query_y)

    def meta_loss(self, tasks: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        """The query loss after adaptation (no graph: Reptile does not minimise a loss)."""
        _, loss, metrics = self._adapted(tasks)
        return loss, metrics

    def meta_backward(self, tasks: TaskBatch, grad: MetaGradient) -> tuple[Tensor, dict[str, float]]:
        final, loss, metrics = self._adapted(tasks)
        for n in self.adapt_names:
            p = self.model.get_parameter(n)
            if p.requires_grad and final[n].dim() == p.dim() + 1:
                grad.add(p, p.detach() - final[n].detach().mean(0))
        return loss, metrics


# -- options and registration -------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class GradientOptions(Options):
    """Options of every gradient-based learner (see the module docstring)."""

    section = "learner"
    inner_steps: int = option(1, low=0, high=10_000, role=TRAINING, doc="inner steps in meta-training")
    inner_steps_eval: int = option(3, low=0, high=10_000, role=ADAPTATION, doc="inner steps at test time")
    inner_lr: float = option(0.4, low=0, low_open=True, high=MAX_STEP, role=ADAPTATION,
                             doc="inner step size: the initial one when step sizes are learned")
    first_order: bool = option(False, role=TRAINING, doc="first-order meta-gradients (FOMAML)")
    step_sizes: Literal["fixed", "per_layer_per_step", "per_element"] = option(
        "fixed", role=ARCHITECTURE, doc="fixed, learned per layer and step (MAML++), or per weight (Meta-SGD)")
    inner_optimizer: Literal["sgd", "adam"] = option("sgd", role=ADAPTATION, doc="the inner-loop optimizer")
    inner_beta1: float = option(0.0, low=0, high=1, high_open=True, role=ADAPTATION, doc="inner Adam's beta1")
    inner_beta2: float = option(0.999, low=0, high=1, high_open=True, role=ADAPTATION, doc="inner Adam's beta2")
    inner_eps: float = option(1e-8, low=0, low_open=True, high=1, role=ADAPTATION, doc="inner Adam's epsilon")
    # Carried state lives in buffers of the learner (checkpointed), so it belongs to the model.
    inner_state: Literal["reset", "carried"] = option(
        "reset", role=ARCHITECTURE, doc="inner Adam's state: reset for every task, or carried across tasks (Reptile's code)")
    inner_batch: int = option(0, low=0, role=TRAINING,
                              doc="support examples per inner step in meta-training; 0 (or more than the "
                                  "support set, with a warning) = the whole support set")
    inner_batch_eval: int = option(0, low=0, role=ADAPTATION,
                                   doc="support examples per inner step at test time; 0 (or more than the "
                                       "support set, with a warning) = the whole support set")
    adapt: str | list[str] = option(
        "all", role=ARCHITECTURE, doc="which parameters adapt: all, head, or a list of name prefixes")
    freeze: list[str] = option([], role=ARCHITECTURE, doc="name prefixes of parameters neither adapted nor learned")
    # The same weights and buffers in both modes, so evaluation may switch (metamap eval --set learner.bn=...).
    bn: Literal["transductive", "running"] = option(
        "transductive", role=ADAPTATION, doc="batch statistics per task, or running statistics at test time")
    multi_step_loss: bool = option(False, role=TRAINING, doc="MAML++ query loss after every inner step")
    msl_anneal_steps: int = option(0, low=0, role=TRAINING, doc="outer steps over which that loss anneals")
    backend: Literal["fast", "reference"] = option(
        "fast", role=RUNTIME, doc="fast: lowered, rewritten batched operations; reference: functional_call per task")
    channels_last: bool = option(True, role=RUNTIME, doc="fast backend lever")
    fuse_bn_pool: bool = option(True, role=RUNTIME, doc="fast backend lever")
    fold_bn: bool = option(True, role=RUNTIME, doc="fast backend lever (false: meta-gradients closer to float64, slower)")
    cpp_kernels: bool = option(True, role=RUNTIME, doc="fast backend lever: the first layer in C++")
    grad_checkpoint: bool = option(False, role=RUNTIME, doc="recompute inner-step activations in the backward")
    zero_head: bool = option(False, role=TRAINING,
                             doc="zero the head before every outer step (Kao et al. 2022; see the module docstring)")
    transductive: bool = option(True, role=ADAPTATION,
                                doc="false: each query is normalised with the support set alone (Reptile's evaluation)")

    @classmethod
    def upgrade(cls, section: dict) -> dict:
        """Retired keys: ``batched = false`` was the reference backend; ``bf16`` moved to ``train.precision``."""
        section = dict(section)
        batched, bf16 = section.pop("batched", True), section.pop("bf16", False)
        if batched is False:
            section["backend"] = "reference"
        if bf16 is not False:
            raise ConfigError("learner.bf16 is replaced by train.precision = \"bf16\" (bfloat16 autocast for the "
                              "whole learner, or \"auto\"); remove learner.bf16")
        return section

    @classmethod
    def upgrade_checkpoint(cls, section: dict) -> dict:
        # A checkpoint trained with the retired learner.bf16 lever has the same weights either way.
        section = cls.upgrade({k: v for k, v in section.items() if k != "bf16"})
        if section and "inner_state" not in section:
            # Written before inner_state existed: its inner state was reset for every task and it
            # has no carried-state buffers, whatever the learner's default is now (Reptile: carried).
            section["inner_state"] = "reset"
        if section and "zero_head" not in section:
            # Written before zero_head existed: trained without zeroing (FOMAML's default since: zeroed).
            section["zero_head"] = False
        return section

    def check(self) -> None:
        if self.inner_optimizer == "adam" and self.step_sizes != "fixed":
            self.fail(f"learner.step_sizes = {self.step_sizes!r} learns SGD step sizes; with "
                      "learner.inner_optimizer = \"adam\" leave step_sizes at \"fixed\"")
        if self.inner_state == "carried" and self.inner_optimizer != "adam":
            self.fail("learner.inner_state = \"carried\" keeps Adam's moments across tasks; "
                      "it needs learner.inner_optimizer = \"adam\" (SGD has no state): with SGD set "
                      "learner.inner_state = \"reset\"")

# Finn et al. (2017), Omniglot 5-way: meta-batch 32, Adam 1e-3, inner step size 0.4, one inner
# step in training. Classification heads are built for ``episode.ways``, so evaluation defaults
# to the same number of ways.
EPISODE = {"ways": 5, "shots": 1, "queries": 15, "tasks_per_batch": 32}
DEFAULTS = {"episode": EPISODE, "optim": {"lr": 1e-3}, "schedule": {"name": "constant"},
            "eval": {"ways": [5], "shots": [1]}}


def build_gradient_learner(config: dict, info: DataInfo, cls=GradientLearner) -> GradientLearner:
    o: GradientOptions = section_options(config, "learner")
    body = build_backbone(config, info)
    if getattr(body, "feature_maps", False):
        # The head is a linear layer on flat features; maps [B, C, H, W] would fail deep in the first step.
        raise ConfigError("model.feature_maps = true makes the backbone return feature maps, which only "
                          "Relation Networks compare; gradient learners put a linear head on flat features: "
                          "set model.feature_maps = false")
    kind = task_kind(info.problem)
    ways = config["episode"]["ways"] if kind.classes else 0
    head = nn.Linear(body.out_features, kind.output_size(ways, info.output_dim))
    return cls(body, head, len(info.example_shape), ways=ways, seed=config["seed"], **o.to_dict())


def _register(name: str, summary: str, cls=GradientLearner, sections: dict | None = None, **learner_defaults):
    options = GradientOptions.with_defaults(f"{name.capitalize()}Options", **learner_defaults) \
        if learner_defaults else GradientOptions
    defaults = {**DEFAULTS, **(sections or {})}

    @register_learner(name, options=options, defaults=defaults, family="optimization", summary=summary)
    def _build(config: dict, info: DataInfo):
        learner = build_gradient_learner(config, info, cls)
        learner.name = name
        return learner
    return _build


_register("maml", "MAML, second order (Finn et al. 2017); first_order, step_sizes, adapt, bn, "
          "multi_step_loss options cover FOMAML, ANIL, Meta-SGD and MAML++")
# Zeroed head by default (Kao et al. 2022): from a random head the first-order meta-gradient points
# nearly orthogonally to the true one at initialisation; on the Vinyals split 5-way 1-shot,
# zeroing led by 5.8 to 22.2 points at each of 22 validations at equal meta-batches over the first
# 15 CPU-minutes, and tested 95.47 against 89.15 (BENCHMARKS.md, "Paper reproductions").
_register("fomaml", "first-order MAML (Finn et al. 2017), head zeroed (Kao et al. 2022)", first_order=True,
          zero_head=True)
_register("anil", "ANIL: only the head adapts (Raghu et al. 2020)", adapt="head")
_register("metasgd", "Meta-SGD: learned per-weight step sizes (Li et al. 2017)", step_sizes="per_element")
# Reptile's Omniglot 5-way recipe (Nichol et al. 2018, their code's flags): training tasks of 10
# shots per class, 5 Adam inner steps (lr 1e-3, beta1 0) on mini-batches of 10, meta-batch 5, an
# SGD outer step of size 1 annealed linearly to 0; 50 inner steps at evaluation on mini-batches
# of 5. Training tasks need no query set; one query per class only feeds the training metrics.
# Their Adam is one optimizer whose moments and step count run on from task to task (only the
# weights are restored after each task), hence inner_state = "carried". Reset for every task,
# each first step is lr * sign(g) for every weight however small its gradient: on Omniglot
# (Vinyals split) validation then peaked at 76.8 % after 1,000 meta-batches and fell to 71.7 %
# by 2,250 while the head's weights grew from norm 1.3 to 30 (BENCHMARKS.md).
REPTILE = {"episode": {"ways": 5, "shots": 10, "queries": 1, "tasks_per_batch": 5},
           "optim": {"name": "sgd", "lr": 1.0}, "schedule": {"name": "linear", "min_lr": 0.0},
           "eval": {"ways": [5], "shots": [1]}}
_register("reptile", "Reptile (Nichol et al. 2018) with its paper's recipe: Adam inner steps on mini-batches, "
          "outer SGD step annealed 1 -> 0", Reptile, sections=REPTILE, inner_steps=5, inner_steps_eval=50,
          inner_optimizer="adam", inner_lr=1e-3, inner_beta1=0.0, inner_state="carried", inner_batch=10,
          inner_batch_eval=5)
