"""The one interface every meta-learner implements: a mapping from a support set to a predictor."""
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from metamap.errors import MetamapError
from metamap.tasks.batch import TaskBatch
from metamap.tasks.kinds import TaskKind, infer_kind

Predictor = Callable[[Tensor], Tensor]
"""Query inputs ``[T, Q, *example_shape]`` -> outputs ``[T, Q, ways]`` (logits) or ``[T, Q, *target_shape]``."""


def as_tensor(x, what: str) -> Tensor:
    """``x`` as a tensor (from a tensor, an array or nested lists of numbers)."""
    if torch.is_tensor(x):
        return x
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as e:
        raise MetamapError(f"{what} must be a tensor or an array of numbers ({e})") from None


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
    # whose accuracy under bf16 was measured unchanged on their default experiment (BENCHMARKS.md);
    # gradient learners stay False even so: bf16 moves MAML's meta-gradient by 10-120 %.
    auto_bf16: ClassVar[bool] = False
    # Old -> new prefixes of state names, for checkpoints written before a rename.
    renamed_state: ClassVar[dict[str, str]] = {}

    def __init__(self, example_dims: int):
        super().__init__()
        self.example_dims = example_dims
        # What one example looks like (set by build_learner from the data): adapt() then names a
        # wrong input instead of failing inside a layer.
        self.example_shape: tuple[int, ...] | None = None

    # -- the mapping -------------------------------------------------------------------------
    def adapt_tasks(self, support_x: Tensor, support_y: Tensor, ways: int) -> Predictor:
        """Batched adaptation: ``support_x [T, S, ...]``, ``support_y [T, S]`` -> predictor."""
        raise NotImplementedError

    def adapt(self, support_x: Tensor, support_y: Tensor, ways: int | None = None) -> Predictor:
        """Adapt to one task or a batch of tasks; see the class docstring for shapes.

        Inputs are checked first, so that a wrong one is named (with its shape, type or value and
        the fix) instead of failing deep inside a layer.
        """
        support_x, support_y = as_tensor(support_x, "support_x"), as_tensor(support_y, "support_y")
        self.check_examples(support_x, "support_x")
        batched = support_x.dim() == self.example_dims + 2
        if not batched:
            support_x, support_y = support_x.unsqueeze(0), support_y.unsqueeze(0)
        if support_x.shape[1] == 0:
            raise MetamapError("adapt: the support set is empty; give at least one labelled example per class")
        if support_y.shape[:2] != support_x.shape[:2]:
            raise MetamapError(f"adapt: support_y has shape {tuple(support_y.shape)} but support_x has "
                               f"{support_x.shape[1]} examples per task; give one label per example")
        support_y, ways = self.check_labels(support_y, ways)
        predictor = self._guarded(self.adapt_tasks, "adapt", support_x)(support_x, support_y, ways)
        return self._checked(predictor, tuple(support_x.shape[2:]), support_x.shape[0], batched)

    def _checked(self, predictor: Predictor, example: tuple, tasks: int, batched: bool) -> Predictor:
        """``predictor`` with its queries checked against the support set it was adapted to."""
        def predict(query_x: Tensor) -> Tensor:
            query_x = as_tensor(query_x, "query_x")
            self.check_examples(query_x, "query_x", single=not batched, example=example)
            if batched and query_x.shape[0] != tasks:
                raise MetamapError(f"query_x has {query_x.shape[0]} task(s) but the predictor was adapted to "
                                   f"{tasks}; give the queries of each task in the same order")
            run = self._guarded(predictor, "the predictor", query_x)
            return run(query_x) if batched else run(query_x.unsqueeze(0)).squeeze(0)
        return predict

    @staticmethod
    def _guarded(fn, what: str, x: Tensor):
        # Whatever the checks above cannot know (a hand-built model's input size, say): the layer's
        # own error, named with the input's shape.
        def run(*args):
            try:
                return fn(*args)
            except RuntimeError as e:
                raise MetamapError(f"{what} failed on inputs of shape {tuple(x.shape)} ({e}); check that the "
                                   "inputs have the shape, channels and type the model was built for") from e
        return run

    def check_examples(self, x: Tensor, what: str, single: bool | None = None, example: tuple | None = None) -> None:
        """``x`` is ``[examples, *example]`` (``single``), ``[tasks, examples, *example]`` (not
        ``single``) or either (``None``), of finite floats shaped like ``example`` (default: the
        learner's ``example_shape``), on the learner's device and in its dtype."""
        allowed = {True: (self.example_dims + 1,), False: (self.example_dims + 2,),
                   None: (self.example_dims + 1, self.example_dims + 2)}[single]
        if x.dim() not in allowed:
            raise MetamapError(
                f"{what} has shape {tuple(x.shape)}; expected [examples, *example] (one task) or "
                f"[tasks, examples, *example] (a batch) with a {self.example_dims}-dimensional example")
        if not x.is_floating_point():
            hint = ("prepare image files with learner.spec.to_input(learner.spec.load_many(paths))"
                    if getattr(self, "spec", None) is not None else "convert it with x.float()")
            raise MetamapError(f"{what} is {x.dtype}, but the model takes floating-point inputs; {hint}")
        self._check_example_shape(x, what, example)
        param = next(self.parameters(), None)
        if param is not None and (x.dtype != param.dtype or x.device != param.device):
            raise MetamapError(f"{what} is {x.dtype} on {x.device}, but the model's weights are {param.dtype} on "
                               f"{param.device}; convert with x.to(dtype={param.dtype}, device='{param.device}')")
        if not bool(torch.isfinite(x).all()):
            raise MetamapError(f"{what} contains NaN or infinite values; clean the inputs first")

    def _check_example_shape(self, x: Tensor, what: str, example: tuple | None) -> None:
        got = tuple(x.shape[x.dim() - self.example_dims:])
        if example is not None and got != example:
            raise MetamapError(f"{what} holds examples of shape {got} but the support set's are {example}; "
                               "give queries prepared like the support set")
        want = self.example_shape
        if want is not None and got != tuple(want):
            kind = ("channels x height x width" if len(want) == 3 else "features") + f" {tuple(want)}"
            fix = ("prepare image files with learner.spec (it resizes and converts them as in training)"
                   if getattr(self, "spec", None) is not None else "resize or convert the inputs to that shape")
            raise MetamapError(f"{what} holds examples of shape {got}, but this learner was built for {kind}; {fix}")

    def check_labels(self, support_y: Tensor, ways) -> tuple[Tensor, int]:
        """Support labels ``[T, S]`` and the number of ways, checked: class labels ``0..ways-1``
        covering every class of each task, or finite real-valued targets for regression."""
        regression = not self.kind.classes if self.kind is not None else support_y.is_floating_point()
        if regression:
            if not support_y.is_floating_point():
                raise MetamapError(f"support_y is {support_y.dtype}; this learner regresses real-valued targets: "
                                   "convert them with y.float()")
            if not bool(torch.isfinite(support_y).all()):
                raise MetamapError("support_y contains NaN or infinite values; clean the targets first")
            return support_y, 0
        if support_y.is_floating_point() or support_y.is_complex() or support_y.dtype == torch.bool:
            raise MetamapError(f"support_y is {support_y.dtype}, but a classifier takes whole-number class "
                               "labels 0..N-1 (e.g. torch.tensor([0, 0, 1, 1]), or y.long())")
        support_y = support_y.long()
        low, high = int(support_y.min()), int(support_y.max())
        if low < 0:
            raise MetamapError(f"support_y holds the label {low}; class labels are 0..N-1, renumber them")
        try:
            ways = high + 1 if ways is None else operator.index(ways)
        except TypeError:
            raise MetamapError(f"ways must be a whole number, not {ways!r}") from None
        if ways < 2:
            raise MetamapError(f"a task needs at least two classes, not {ways} (ways = {ways}); give support "
                               "examples of two or more classes")
        if high >= ways:
            raise MetamapError(f"support_y holds the label {high}, but a {ways}-way task has labels 0..{ways - 1}")
        present = torch.zeros(support_y.shape[0], ways, dtype=torch.bool).scatter_(1, support_y.cpu(), True)
        if not bool(present.all()):
            raise MetamapError(f"adapt: support labels must cover every class 0..{ways - 1} of each task "
                               "(at least one example per class)")
        return support_y, ways

    def upgrade_state(self, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """A checkpoint's tensors under today's names (see ``renamed_state``)."""
        own = self.state_dict()

        def renamed(key: str) -> str:
            for old, new in self.renamed_state.items():
                if key not in own and key.startswith(old):
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


def embed_tasks(encoder: nn.Module, x: Tensor, keep_shape: bool = False) -> Tensor:
    """Run ``encoder`` over ``x [T, S, *example]`` -> ``[T, S, features]`` (``keep_shape``: the
    encoder's output shape per example, e.g. feature maps ``[T, S, C, H, W]``).

    In training mode each task goes through the encoder on its own, so BatchNorm statistics
    are per task: a task's result does not depend on the other tasks of the meta-batch, nor on
    how a meta-batch is split across processes. At evaluation (running statistics) all tasks
    run as one batch.
    """
    t, s = x.shape[:2]
    if encoder.training and t > 1:
        z = torch.stack([encoder(task) for task in x.unbind(0)])
    else:
        z = encoder(x.flatten(0, 1))
        z = z.reshape(t, s, *z.shape[1:])
    return z if keep_shape else z.reshape(t, s, -1)
