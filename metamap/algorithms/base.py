"""The one interface every meta-learner implements: a mapping from a support set to a predictor."""
from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from metamap.errors import MetamapError
from metamap.tasks.batch import TaskBatch
from metamap.tasks.kinds import TaskKind, infer_kind

Predictor = Callable[[Tensor], Tensor]
"""Query inputs ``[T, Q, *example_shape]`` -> outputs ``[T, Q, ways]`` (logits) or ``[T, Q, *target_shape]``."""


class MetaGradient:
    """Where a learner puts its meta-gradient for one part of a meta-batch (see ``meta_backward``).

    ``weight`` is the part's share of the meta-batch's tasks, so that the parts' contributions
    add up to the whole batch's mean; ``scaler`` (fp16 training) scales them as the trainer's
    gradient scaler expects. Gradients accumulate into ``.grad`` of the learner's parameters.

    ``optimizer`` is the trainer's outer optimizer (its learning rate already scheduled), for a
    learner that takes several outer steps per batch itself (PPO epochs): it steps it and leaves
    every ``.grad`` at ``None``, so the trainer's own step changes nothing; the optimizer's state
    stays in the trainer's checkpoints. Such steps happen before the divergence guard looks at
    the loss, so the guard cannot undo them.
    """

    def __init__(self, weight: float = 1.0, scaler=None, optimizer=None):
        self.weight, self.scaler, self.optimizer = float(weight), scaler, optimizer

    def _scaled(self, t: Tensor) -> Tensor:
        t = t * self.weight
        return self.scaler.scale(t) if self.scaler is not None else t

    def backward(self, loss: Tensor) -> None:
        """Add the gradient of ``loss`` (the part's mean loss) by backpropagation."""
        if loss.dtype in (torch.float16, torch.bfloat16):
            loss = loss.float()
        with torch.autocast(loss.device.type, enabled=False):
            self._scaled(loss).backward()

    def add(self, param: Tensor, grad: Tensor) -> None:
        """Add ``grad`` (the part's mean meta-gradient for ``param``) directly."""
        g = self._scaled(grad.detach().to(param.dtype))
        if param.grad is None:
            param.grad = g.clone()
        else:
            param.grad.add_(g)


class MetaLearner(nn.Module):
    """Base class of all meta-learners.

    A subclass says how it adapts, in :meth:`adapt_tasks`; training, sampling, checkpoints
    and evaluation are shared. ``adapt`` accepts one task (``support_x [S, *example_shape]``)
    or a batch of tasks (``[T, S, *example_shape]``) and returns a predictor of the same kind.

    ``example_dims`` is the number of dimensions of one example (3 for ``[C, H, W]`` images,
    1 for feature vectors), which tells a single task from a batch of tasks.
    """

    name: ClassVar[str] = "meta-learner"
    family: ClassVar[str] = ""
    # Adaptation that takes gradient steps needs autograd even at evaluation time.
    adapts_with_gradients: ClassVar[bool] = False
    # The task kind (loss, metrics): set by build_learner; None = inferred from the labels.
    kind: TaskKind | None = None
    # train.precision = "auto" runs bf16 autocast (on hardware with native bf16) only for learners
    # whose accuracy under bf16 was measured unchanged on their default experiment (BENCHMARKS.md).
    auto_bf16: ClassVar[bool] = False
    # Old -> new prefixes of state names, for checkpoints written before a rename.
    renamed_state: ClassVar[dict[str, str]] = {}

    def __init__(self, example_dims: int):
        super().__init__()
        self.example_dims = example_dims

    # -- the mapping -------------------------------------------------------------------------
    def adapt_tasks(self, support_x: Tensor, support_y: Tensor, ways: int) -> Predictor:
        """Batched adaptation: ``support_x [T, S, ...]``, ``support_y [T, S]`` -> predictor."""
        raise NotImplementedError

    def adapt(self, support_x: Tensor, support_y: Tensor, ways: int | None = None) -> Predictor:
        """Adapt to one task or a batch of tasks; see the class docstring for shapes."""
        support_x, support_y = torch.as_tensor(support_x), torch.as_tensor(support_y)
        self.check_examples(support_x, "support_x")
        batched = support_x.dim() == self.example_dims + 2
        if not batched:
            support_x, support_y = support_x.unsqueeze(0), support_y.unsqueeze(0)
        if support_y.shape[:2] != support_x.shape[:2]:
            raise MetamapError(f"adapt: support_y has shape {tuple(support_y.shape)} but support_x has "
                               f"{support_x.shape[1]} examples per task; give one label per example")
        classification = not torch.is_floating_point(support_y)
        if ways is None:
            ways = int(support_y.max()) + 1 if classification and support_y.numel() else 0
        if classification:
            present = torch.zeros(support_y.shape[0], ways, dtype=torch.bool).scatter_(1, support_y.cpu(), True)
            if support_y.min() < 0 or not bool(present.all()):
                raise MetamapError(f"adapt: support labels must cover every class 0..{ways - 1} of each task "
                                   "(at least one example per class)")
        predictor = self.adapt_tasks(support_x, support_y, ways)
        if batched:
            return self._checked(predictor)

        def single(query_x: Tensor) -> Tensor:
            self.check_examples(query_x, "query_x", single=True)
            return predictor(query_x.unsqueeze(0)).squeeze(0)
        return single

    def _checked(self, predictor: Predictor) -> Predictor:
        def batched(query_x: Tensor) -> Tensor:
            self.check_examples(query_x, "query_x")
            return predictor(query_x)
        return batched

    def check_examples(self, x: Tensor, what: str, single: bool | None = None) -> None:
        allowed = {True: (self.example_dims + 1,), False: (self.example_dims + 2,),
                   None: (self.example_dims + 1, self.example_dims + 2)}[single]
        if x.dim() not in allowed:
            raise MetamapError(
                f"{what} has shape {tuple(x.shape)}; expected [examples, *example] (one task) or "
                f"[tasks, examples, *example] (a batch) with a {self.example_dims}-dimensional example")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise MetamapError(f"{what} contains NaN or infinite values; clean the inputs first")

    def upgrade_state(self, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """A checkpoint's tensors under today's names (see ``renamed_state``)."""
        def renamed(key: str) -> str:
            for old, new in self.renamed_state.items():
                if key.startswith(old):
                    return new + key[len(old):]
            return key
        return {renamed(k): v for k, v in weights.items()}

    # -- what meta-training minimises ----------------------------------------------------------
    def meta_loss(self, tasks: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        """Mean query loss over the tasks after adapting to their support sets, plus metrics."""
        predictor = self.adapt_tasks(tasks.support_x, tasks.support_y, tasks.ways)
        outputs = predictor(tasks.query_x)
        return self.query_loss(outputs, tasks.query_y), self.task_metrics(outputs.detach(), tasks.query_y)

    def meta_backward(self, tasks: TaskBatch, grad: MetaGradient) -> tuple[Tensor, dict[str, float]]:
        """Put the meta-gradient of ``tasks`` into ``grad``; return the (detached) loss and metrics.

        The trainer calls this once per part of a meta-batch. The default backpropagates
        :meth:`meta_loss`; a learner whose update is not the gradient of a loss (Reptile) writes
        its update direction with ``grad.add(param, direction)`` instead.
        """
        loss, metrics = self.meta_loss(tasks)
        grad.backward(loss)
        return loss.detach(), metrics

    def preferred_chunk(self) -> int:
        """Tasks per forward/backward pass when ``train.chunk_tasks = "auto"``; 0 = the whole meta-batch."""
        return 0

    def after_step(self) -> None:
        """Called by the trainer once per applied outer update (after ``optimizer.step``).

        For state that counts meta-batches (e.g. MAML++'s loss annealing): ``meta_loss`` may run
        several times per update when the trainer splits a meta-batch into chunks.
        """

    # -- test-time fine-tuning (metamap/train/test_time.py) ---------------------------------------
    def finetune_start(self, support_x: Tensor, support_y: Tensor, ways: int) -> tuple[list[Tensor], object]:
        """Task-specific tensors fine-tuned together with the learner's weights, and the state that
        holds them (e.g. a head fitted on the support set). Default: none -- prototypes, attention
        and the like are recomputed from the support set with the current weights."""
        return [], None

    def finetune_loss(self, support_x: Tensor, support_y: Tensor, pseudo_x: Tensor, ways: int,
                      state: object) -> Tensor:
        """What test-time fine-tuning minimises: the loss, on ``pseudo_x`` (augmented copies of the
        support examples, labels ``support_y``), of the predictor adapted to the plain support set."""
        return self.query_loss(self.adapt_tasks(support_x, support_y, ways)(pseudo_x), support_y)

    def finetuned_predictor(self, support_x: Tensor, support_y: Tensor, ways: int, state: object) -> Predictor:
        """The predictor after test-time fine-tuning (default: adapt as usual, with the tuned weights)."""
        return self.adapt_tasks(support_x, support_y, ways)

    # -- the task kind: adaptation loss and metrics ----------------------------------------------
    def task_kind(self, targets: Tensor) -> TaskKind:
        """The kind of task this learner serves (set from the data by ``build_learner``); a learner
        built by hand infers it from the labels (class labels or real-valued targets)."""
        return self.kind if self.kind is not None else infer_kind(targets)

    def query_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The task kind's loss averaged over tasks (cross-entropy, mean squared error...)."""
        return self.task_kind(targets).loss(outputs, targets).mean()

    def task_metrics(self, outputs: Tensor, targets: Tensor) -> dict[str, float]:
        """Every metric of the task kind, averaged over the tasks."""
        return {k: float(v.mean()) for k, v in self.task_kind(targets).scores(outputs, targets).items()}


class EncodingLearner(MetaLearner):
    """A learner that encodes every example on its own and adapts on the encodings.

    ``adapt_tasks`` is :meth:`adapt_encoded` applied to :meth:`encode`'s output. When the
    encoding of an example does not depend on the rest of its episode (:meth:`encodes_per_example`:
    evaluation mode, no batch statistics), the evaluator encodes each distinct example of a
    split once and builds every episode from those codes: the same predictions, a fraction of
    the forward passes.
    """

    encoder: nn.Module

    def encode(self, x: Tensor) -> Tensor:
        """``x [T, N, *example]`` -> codes ``[T, N, *code]``."""
        return embed_tasks(self.encoder, x)

    def adapt_encoded(self, support_z: Tensor, support_y: Tensor, ways: int) -> Predictor:
        """Codes ``support_z [T, S, *code]`` -> predictor of query codes ``[T, Q, *code]``."""
        raise NotImplementedError

    def adapt_tasks(self, support_x: Tensor, support_y: Tensor, ways: int) -> Predictor:
        predict = self.adapt_encoded(self.encode(support_x), support_y, ways)
        return lambda query_x: predict(self.encode(query_x))

    def encodes_per_example(self) -> bool:
        """Whether an example's code is a function of that example alone, right now: evaluation
        mode, and no batch norm that normalises with batch statistics at evaluation."""
        def batch_dependent(m: nn.Module) -> bool:
            # Training mode: batch statistics, dropout. Batch norm without running statistics
            # normalises with the batch's even at evaluation (instance norm is per example).
            return m.training or (isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is None
                                  and not isinstance(m, nn.modules.instancenorm._InstanceNorm))
        return not any(batch_dependent(m) for m in self.encoder.modules())


def embed_tasks(encoder: nn.Module, x: Tensor) -> Tensor:
    """Run ``encoder`` over ``x [T, S, *example]`` -> ``[T, S, features]``.

    In training mode each task goes through the encoder on its own, so BatchNorm statistics
    are per task: a task's result does not depend on the other tasks of the meta-batch, nor on
    how a meta-batch is split across processes. At evaluation (running statistics) all tasks
    run as one batch.
    """
    t, s = x.shape[:2]
    if encoder.training and t > 1:
        return torch.stack([encoder(task) for task in x.unbind(0)]).reshape(t, s, -1)
    return encoder(x.flatten(0, 1)).reshape(t, s, -1)
