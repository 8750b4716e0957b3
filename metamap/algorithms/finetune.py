"""The fine-tuning baseline (the transfer-learning recipe; "Baseline" and "Baseline++" of
Chen, Liu, Kira, Wang & Huang, 2019).

Meta-training is ordinary classification: the backbone and a classifier over *all* training
classes learn from the episodes' examples with their global class ids. To adapt to a new task,
a fresh head is fitted on the support set's features (a linear layer, or Baseline++'s cosine
classifier), optionally fine-tuning a copy of the backbone with it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metamap.algorithms.base import EncodingLearner, Predictor, embed_tasks
from metamap.errors import ConfigError, MetamapError
from metamap.options import ADAPTATION, ARCHITECTURE, MAX_STEP, Options, option
from metamap.registry import DataInfo, build_backbone, register_learner, section_options
from metamap.tasks.batch import TaskBatch

HEADS = ("linear", "cosine")
# How the cosine head's logits are scaled: a constant, one learned scalar, or a learned norm per
# class (Chen et al.'s code: weight normalisation of the class weights, times a constant).
COSINE_NORMS = ("fixed", "learned", "per_class")


class CosineClassifier(nn.Module):
    """Baseline++'s head: ``scale * gain_c * cos(feature, class weight c)``, ``[B, D]`` -> ``[B, classes]``.

    ``norm = "fixed"``: ``scale`` is a constant and there is no gain; ``"learned"``: ``scale``
    is a parameter started at the given value; ``"per_class"``: a learned ``gain`` per class
    (started at 1) multiplies the constant ``scale``.
    """

    def __init__(self, features: int, classes: int, scale: float = 10.0, norm: str = "fixed"):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, features) * features ** -0.5)
        self.norm = norm
        self.scale = nn.Parameter(torch.tensor(float(scale))) if norm == "learned" else float(scale)
        self.gain = nn.Parameter(torch.ones(classes)) if norm == "per_class" else None

    def forward(self, z: Tensor) -> Tensor:
        return cosine_logits(z, self.weight, self.scale, self.gain)


def cosine_logits(z: Tensor, weight: Tensor, scale: Tensor | float, gain: Tensor | None = None) -> Tensor:
    """``z [..., B, D]``, ``weight [..., N, D]`` (``gain [..., N]``) -> ``scale * gain * cosine`` ``[..., B, N]``."""
    logits = scale * F.normalize(z, dim=-1) @ F.normalize(weight, dim=-1).transpose(-1, -2)
    return logits if gain is None else logits * gain.unsqueeze(-2)


class TaskHead:
    """One new head per task, fitted on that task's support features.

    ``linear``: ``z W^T + b`` from zeros (the problem is convex, so the start hardly matters and
    zeros need no RNG); ``cosine``: Baseline++, started from the normalised class means, with
    a fitted gain per class (started at 1) when ``per_class``.
    """

    def __init__(self, kind: str, support_z: Tensor, support_y: Tensor, ways: int, scale: float,
                 per_class: bool = False):
        t, _, d = support_z.shape
        self.kind, self.scale = kind, scale
        if kind == "linear":
            self.params = [support_z.new_zeros(t, ways, d), support_z.new_zeros(t, ways)]
        else:
            onehot = F.one_hot(support_y, ways).to(support_z.dtype).transpose(1, 2)        # [T, ways, S]
            self.params = [onehot @ F.normalize(support_z.detach(), dim=-1)]
            if per_class:
                self.params.append(support_z.new_ones(t, ways))
        self.params = [p.requires_grad_() for p in self.params]

    def __call__(self, z: Tensor) -> Tensor:
        """``z [T, Q, D]`` -> logits ``[T, Q, ways]``."""
        if self.kind == "linear":
            weight, bias = self.params
            return z @ weight.transpose(1, 2) + bias.unsqueeze(1)
        return cosine_logits(z, *self.params[:1], self.scale, *self.params[1:])


class FineTuneBaseline(EncodingLearner):
    name = "finetune"
    family = "baseline"
    adapts_with_gradients = True

    def __init__(self, encoder: nn.Module, example_dims: int, features: int, num_classes: int,
                 head: str = "linear", scale: float = 10.0, steps: int = 100, lr: float = 0.01,
                 finetune_backbone: bool = False, backbone_lr: float = 0.001, cosine_norm: str = "fixed"):
        super().__init__(example_dims)
        if head not in HEADS:
            raise ConfigError(f"learner.head must be one of {', '.join(HEADS)}, not {head!r}")
        if cosine_norm not in COSINE_NORMS:
            raise ConfigError(f"learner.cosine_norm must be one of {', '.join(COSINE_NORMS)}, not {cosine_norm!r}")
        self.cosine_norm = cosine_norm
        if num_classes < 2:
            raise ConfigError("the fine-tuning baseline pre-trains a classifier and needs at least 2 training classes")
        self.encoder, self.head, self.scale = encoder, head, scale
        self.steps, self.lr, self.finetune_backbone, self.backbone_lr = steps, lr, finetune_backbone, backbone_lr
        self.classifier = nn.Linear(features, num_classes) if head == "linear" else \
            CosineClassifier(features, num_classes, scale, cosine_norm)

    # -- pre-training: an ordinary classifier over all training classes -----------------------------
    def meta_loss(self, tasks: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        if tasks.classes is None:
            raise MetamapError("the fine-tuning baseline needs the episodes' global class ids (TaskBatch.classes)")
        x = torch.cat([tasks.support_x, tasks.query_x], 1)
        y = tasks.classes.gather(1, torch.cat([tasks.support_y, tasks.query_y], 1))          # global labels
        logits = self.classifier(embed_tasks(self.encoder, x))                               # [T, E, classes]
        return self.query_loss(logits, y), self.task_metrics(logits.detach(), y)

    # -- adaptation: a new head on the support set ----------------------------------------------
    def fit(self, encoder: nn.Module, support_x: Tensor, support_y: Tensor, ways: int) -> TaskHead:
        """Fit a head (and, with ``finetune_backbone``, ``encoder``) by ``steps`` full-batch SGD steps."""
        tune = [p for p in encoder.parameters() if p.requires_grad] if self.finetune_backbone else []
        with torch.set_grad_enabled(bool(tune)):
            z = embed_tasks(encoder, support_x)
        return self.fit_head(z, support_y, ways, encoder, support_x, tune)

    def fit_head(self, z: Tensor, support_y: Tensor, ways: int, encoder: nn.Module | None = None,
                 support_x: Tensor | None = None, tune: list[Tensor] = ()) -> TaskHead:
        """Fit a head on the support features ``z [T, S, D]``; with ``tune``, those encoder
        weights are fine-tuned too, re-encoding ``support_x`` every step."""
        head = TaskHead(self.head, z.detach(), support_y, ways, self.task_scale(), self.cosine_norm == "per_class")
        tune = list(tune)
        params, rates = head.params + tune, [self.lr] * len(head.params) + [self.backbone_lr] * len(tune)
        velocity = [torch.zeros_like(p) for p in params]
        with torch.enable_grad():
            for _ in range(self.steps):
                features = embed_tasks(encoder, support_x) if tune else z.detach()
                # Per-task means summed over tasks, so each task's head gets exactly its own gradient.
                loss = F.cross_entropy(head(features).transpose(1, 2), support_y, reduction="none").mean(1).sum()
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    # Chen et al.'s recipe: SGD with momentum 0.9 and weight decay 1e-3.
                    for p, v, g, lr in zip(params, velocity, grads, rates, strict=True):
                        p.sub_(lr * v.mul_(0.9).add_(g + 1e-3 * p))
        head.params = [p.detach() for p in head.params]
        return head

    def task_scale(self) -> float:
        """The cosine scale of a new task's head: the pre-trained one when it is learned."""
        return float(self.classifier.scale) if self.cosine_norm == "learned" else self.scale

    def encode(self, x: Tensor) -> Tensor:
        # Adaptation fits a head on fixed features: no graph through the backbone is needed.
        with torch.no_grad():
            return embed_tasks(self.encoder, x)

    def adapt_encoded(self, support_z: Tensor, support_y: Tensor, ways: int) -> Predictor:
        if self.finetune_backbone:
            raise MetamapError("with learner.finetune_backbone the features change per task: adapt on inputs")
        head = self.fit_head(support_z, support_y, ways)

        def predict(query_z: Tensor) -> Tensor:
            with torch.no_grad():
                return head(query_z)
        return predict

    def encodes_per_example(self) -> bool:
        return not self.finetune_backbone and super().encodes_per_example()

    def adapt_tasks(self, support_x: Tensor, support_y: Tensor, ways: int) -> Predictor:
        if not self.finetune_backbone:
            return super().adapt_tasks(support_x, support_y, ways)
        # Each task fine-tunes its own copy of the backbone.
        tuned = [self.tuned_copy(support_x[i:i + 1], support_y[i:i + 1], ways) for i in range(support_x.shape[0])]

        def predict(query_x: Tensor) -> Tensor:
            return torch.cat([head(embed_tasks(enc, query_x[i:i + 1])) for i, (enc, head) in enumerate(tuned)])
        return predict

    # -- test-time fine-tuning: the fitted head and the backbone together ---------------------------
    def finetune_start(self, support_x: Tensor, support_y: Tensor, ways: int) -> tuple[list[Tensor], TaskHead]:
        head = self.fit(self.encoder, support_x, support_y, ways)
        head.params = [p.detach().clone().requires_grad_() for p in head.params]
        return head.params, head

    def finetune_loss(self, support_x: Tensor, support_y: Tensor, pseudo_x: Tensor, ways: int,
                      state: TaskHead) -> Tensor:
        return self.query_loss(state(embed_tasks(self.encoder, pseudo_x)), support_y)

    def finetuned_predictor(self, support_x: Tensor, support_y: Tensor, ways: int, state: TaskHead) -> Predictor:
        def predict(query_x: Tensor) -> Tensor:
            with torch.no_grad():
                return state(embed_tasks(self.encoder, query_x))
        return predict

    def tuned_copy(self, support_x: Tensor, support_y: Tensor, ways: int) -> tuple[nn.Module, TaskHead]:
        encoder = copy.deepcopy(self.encoder).requires_grad_(True)
        head = self.fit(encoder, support_x, support_y, ways)
        return encoder.requires_grad_(False), head


@dataclass(frozen=True, kw_only=True)
class FineTuneOptions(Options):
    section = "learner"
    head: Literal["linear", "cosine"] = option("linear", role=ARCHITECTURE,
                                               doc="linear, or Baseline++'s cosine classifier")
    scale: float = option(10.0, low=0, low_open=True, high=MAX_STEP, role=ARCHITECTURE, doc="cosine head: logits = scale * cosine")
    steps: int = option(100, low=0, high=10_000, role=ADAPTATION, doc="SGD steps fitting the new head")
    lr: float = option(0.01, low=0, low_open=True, high=MAX_STEP, role=ADAPTATION, doc="step size of the new head")
    finetune_backbone: bool = option(False, role=ADAPTATION, doc="also fine-tune a copy of the backbone per task")
    backbone_lr: float = option(0.001, low=0, low_open=True, high=MAX_STEP, role=ADAPTATION,
                                doc="step size of the backbone copy (finetune_backbone)")
    cosine_norm: Literal["fixed", "learned", "per_class"] = option(
        "fixed", role=ARCHITECTURE, doc="cosine head's scale: fixed, learned, or per class (see the module docstring)")


@register_learner("finetune", options=FineTuneOptions, family="baseline",
                  summary="Fine-tuning baseline: pre-trained classifier, new linear or cosine (Baseline++) head")
def _build(config: dict, info: DataInfo) -> FineTuneBaseline:
    o: FineTuneOptions = section_options(config, "learner")
    if info.problem != "classification":
        raise ConfigError("the fine-tuning baseline is for classification data")
    encoder = build_backbone(config, info)
    return FineTuneBaseline(encoder, len(info.example_shape), encoder.out_features, info.num_train_classes,
                            o.head, o.scale, o.steps, o.lr, o.finetune_backbone, o.backbone_lr, o.cosine_norm)
