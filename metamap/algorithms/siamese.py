"""Siamese networks (Koch, Zemel & Salakhutdinov, 2015).

Twin encoders with shared weights learn a similarity between two examples from same/different
pairs. Two objectives: the contrastive loss on the Euclidean distance (Hadsell et al. 2006),
or Koch's verification head, a sigmoid over a weighted L1 distance, trained with binary
cross-entropy. At test time a query takes the class of its most similar support example.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metamap.algorithms.base import EncodingLearner, Predictor
from metamap.algorithms.seeding import content_generator
from metamap.errors import ConfigError
from metamap.options import ARCHITECTURE, MAX_STEP, TRAINING, Options, option
from metamap.registry import DataInfo, build_backbone, register_learner, section_options
from metamap.tasks.batch import TaskBatch

LOSSES = ("contrastive", "bce")


def euclidean(a: Tensor, b: Tensor) -> Tensor:
    """Distance over the last dimension; clamped under the root so equal inputs keep a finite gradient."""
    return ((a - b) ** 2).sum(-1).clamp_min(1e-12).sqrt()


def contrastive_loss(distance: Tensor, same: Tensor, margin: float) -> Tensor:
    """``1/(2N) sum[y d^2 + (1 - y) max(0, m - d)^2]`` over ``N`` pairs; ``same`` is y (1 = same class)."""
    return (same * distance ** 2 + (1 - same) * F.relu(margin - distance) ** 2).mean() / 2


def nearest_support_class(scores: Tensor, labels: Tensor, ways: int) -> Tensor:
    """``scores [T, Q, S]``, ``labels [T, S]`` -> ``[T, Q, ways]``: each class's best support score."""
    member = F.one_hot(labels, ways).transpose(1, 2).bool()               # [T, ways, S]
    return scores.unsqueeze(2).masked_fill(~member.unsqueeze(1), float("-inf")).amax(-1)


def rows(z: Tensor, index: Tensor) -> Tensor:
    """``z [T, E, D]``, ``index [T, P]`` -> ``z[t, index[t, p]]`` as ``[T, P, D]``."""
    return z.gather(1, index.to(z.device).unsqueeze(-1).expand(-1, -1, z.shape[-1]))


def balanced_pairs(labels: Tensor, pairs: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Draw ``pairs // 2`` same-class and ``pairs // 2`` different-class pairs per task.

    ``labels [T, E]`` -> first ``[T, P]`` and second ``[T, P]`` example positions and ``same [T, P]``
    (1.0 for same-class pairs). A pair never repeats an example; the first example is drawn
    uniformly (among those that have a partner), the second uniformly among valid partners.
    """
    t, e = labels.shape
    half = pairs // 2
    equal = labels.unsqueeze(2) == labels.unsqueeze(1)                     # [T, E, E]
    partners = {1.0: equal & ~torch.eye(e, dtype=torch.bool), 0.0: ~equal}
    firsts, seconds, same = [], [], []
    for y, mask in partners.items():
        has_partner = mask.any(-1).float()                                  # [T, E]
        first = torch.multinomial(has_partner, half, replacement=True, generator=generator)   # [T, half]
        rows = mask.gather(1, first.unsqueeze(-1).expand(-1, -1, e)).float().flatten(0, 1)
        second = torch.multinomial(rows, 1, generator=generator).view(t, half)
        firsts.append(first), seconds.append(second), same.append(torch.full((t, half), y))
    return torch.cat(firsts, 1), torch.cat(seconds, 1), torch.cat(same, 1)


class SiameseNetwork(EncodingLearner):
    name = "siamese"
    family = "metric"

    @property
    def auto_bf16(self) -> bool:
        # Measured on the default experiment (contrastive loss): 79.51 / 55.58 % in bf16 against
        # 78.45 / 54.14 % in fp32 (BENCHMARKS.md); the BCE verification head was not measured.
        return self.loss == "contrastive"

    def __init__(self, encoder: nn.Module, example_dims: int, features: int, loss: str = "contrastive",
                 margin: float = 1.0, pairs: int = 256, seed: int = 0, normalize: bool = False):
        super().__init__(example_dims)
        if not isinstance(normalize, bool):
            raise ConfigError(f"learner.normalize must be true or false, not {normalize!r}")
        if not (isinstance(margin, (int, float)) and margin > 0):
            raise ConfigError(f"learner.margin must be a positive number, not {margin!r}")
        if loss not in LOSSES:
            raise ConfigError(f"learner.loss must be one of {', '.join(LOSSES)}, not {loss!r}")
        if pairs < 2 or pairs % 2:
            raise ConfigError(f"learner.pairs must be an even number >= 2 (half same, half different), not {pairs}")
        self.encoder, self.loss, self.margin, self.pairs, self.seed = encoder, loss, margin, pairs, seed
        self.normalize = normalize
        # Koch's verification head: weights on the component-wise L1 distance, then a sigmoid.
        self.head = nn.Linear(features, 1) if loss == "bce" else None

    def similarity(self, a: Tensor, b: Tensor) -> Tensor:
        """Broadcast ``a [..., D]`` against ``b [..., D]`` -> ``[...]``: higher means more alike."""
        if self.head is not None:
            return self.head((a - b).abs()).squeeze(-1)     # the logit of P(same class)
        return -euclidean(a, b)

    def encode(self, x: Tensor) -> Tensor:
        """``x [T, N, *example]`` -> ``[T, N, D]``, on the unit sphere with ``normalize``."""
        z = super().encode(x)
        return F.normalize(z, dim=-1) if self.normalize else z

    def adapt_encoded(self, support_z: Tensor, support_y: Tensor, ways: int) -> Predictor:
        def predict(query_z: Tensor) -> Tensor:
            scores = self.similarity(query_z.unsqueeze(2), support_z.unsqueeze(1))
            return nearest_support_class(scores, support_y, ways)
        return predict

    def pair_loss(self, a: Tensor, b: Tensor, same: Tensor) -> Tensor:
        if self.head is not None:
            return F.binary_cross_entropy_with_logits(self.similarity(a, b), same)
        return contrastive_loss(euclidean(a, b), same, self.margin)

    def meta_loss(self, tasks: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        # Pairs come from all of the episode's examples (support and query), embedded once.
        s = tasks.support_x.shape[1]
        z = self.encode(torch.cat([tasks.support_x, tasks.query_x], 1))   # [T, E, D]
        labels = torch.cat([tasks.support_y, tasks.query_y], 1).cpu()
        first, second, same = balanced_pairs(labels, self.pairs, content_generator(self.seed, tasks.support_x))
        loss = self.pair_loss(rows(z, first), rows(z, second), same.to(z))
        with torch.no_grad():
            scores = self.similarity(z[:, s:].unsqueeze(2), z[:, :s].unsqueeze(1))
            outputs = nearest_support_class(scores, tasks.support_y, tasks.ways)
        return loss, self.task_metrics(outputs, tasks.query_y)


@dataclass(frozen=True, kw_only=True)
class SiameseOptions(Options):
    section = "learner"
    loss: Literal["contrastive", "bce"] = option(
        "contrastive", role=ARCHITECTURE, doc="contrastive on the distance, or Koch's BCE verification head")
    margin: float = option(1.0, low=0, low_open=True, high=MAX_STEP, role=TRAINING, doc="contrastive loss margin")
    pairs: int = option(256, low=2, high=1 << 20, role=TRAINING,
                        doc="pairs per task, half same-class and half different (even)")

    normalize: bool = option(False, role=ARCHITECTURE, doc="embeddings on the unit sphere")

    def check(self) -> None:
        if self.pairs % 2:
            self.fail(f"learner.pairs must be an even number >= 2 (half same, half different), not {self.pairs}")


@register_learner("siamese", options=SiameseOptions, family="metric",
                  summary="Siamese networks, contrastive or BCE verification loss (Koch et al. 2015)")
def _build(config: dict, info: DataInfo) -> SiameseNetwork:
    o: SiameseOptions = section_options(config, "learner")
    encoder = build_backbone(config, info)
    return SiameseNetwork(encoder, len(info.example_shape), encoder.out_features, o.loss, o.margin, o.pairs,
                          seed=config["seed"], normalize=o.normalize)
