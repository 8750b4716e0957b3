"""Relation Networks (Sung, Yang, Zhang, Xiang, Torr & Hospedales, 2018).

Instead of a fixed distance, a learned relation module scores each (class, query) pair: the
class's summed support feature maps are concatenated with the query's along the channels and
mapped to a relation score in [0, 1]. Training regresses the scores onto the one-hot match
with a mean squared error, as in the paper.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metamap.algorithms.base import EncodingLearner, Predictor, embed_tasks
from metamap.errors import ConfigError
from metamap.nets.backbones import Conv4, conv_block
from metamap.options import ARCHITECTURE, Options, option
from metamap.registry import DataInfo, build_backbone, register_learner, section_options
from metamap.tasks.batch import TaskBatch


def relation_encoder(in_channels: int, hidden: int = 64, norm: bool = True, image_size: int = 28) -> Conv4:
    """The paper's embedding module: four conv blocks, pooling only in the first two -- the
    ``conv4`` backbone with ``unpooled = 2, feature_maps = true``.

    It keeps feature maps (``[B, hidden, H/4, W/4]``) for the relation module to compare.
    """
    return Conv4(in_channels, hidden, 4, image_size, norm, unpooled=2, feature_maps=True)


class RelationModule(nn.Module):
    """Two conv blocks and two fully connected layers: a (class, query) pair of feature maps -> a score in [0, 1]."""

    def __init__(self, channels: int, side: int, hidden: int = 8):
        super().__init__()
        self.convs = nn.Sequential(conv_block(2 * channels, channels), conv_block(channels, channels))
        flat = channels * (side // 4) ** 2
        if flat == 0:
            raise ConfigError(f"relation module: {side}x{side} feature maps are too small for two poolings")
        self.fc = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid())

    def score_pairs(self, pairs: Tensor) -> Tensor:
        """The module as the paper draws it: concatenated maps ``[B, 2C, H, W]`` -> ``[B]``."""
        return self.fc(self.convs(pairs).flatten(1)).squeeze(-1)

    def forward(self, classes: Tensor, queries: Tensor) -> Tensor:
        """Every pair of ``classes [T, N, C, H, W]`` and ``queries [T, Q, C, H, W]`` -> ``[T, Q, N]``.

        Same result as :meth:`score_pairs` on all Q*N concatenations, but cheaper: a convolution
        of a concatenation is the sum of convolutions of its parts, so the first (and costliest)
        convolution runs on the N + Q maps once instead of on Q*N pairs.
        """
        t, n, c = classes.shape[:3]
        q = queries.shape[1]
        conv = self.convs[0][0]
        per_class = F.conv2d(classes.flatten(0, 1), conv.weight[:, :c], conv.bias, padding=conv.padding)
        per_query = F.conv2d(queries.flatten(0, 1), conv.weight[:, c:], padding=conv.padding)
        first = per_class.unflatten(0, (t, 1, n)) + per_query.unflatten(0, (t, q, 1))   # [T, Q, N, C, H, W]
        x = self.convs[1](self.convs[0][1:](first.flatten(0, 2)))
        return self.fc(x.flatten(1)).view(t, q, n)


def embed_maps(encoder: nn.Module, x: Tensor) -> Tensor:
    """``x [T, S, *example]`` -> feature maps ``[T, S, *map_shape]``, one task at a time in
    training (batch statistics per task, as :func:`embed_tasks`)."""
    return embed_tasks(encoder, x, keep_shape=True)


def class_sums(maps: Tensor, labels: Tensor, ways: int) -> Tensor:
    """``maps [T, S, *m]``, ``labels [T, S]`` -> per-class sums ``[T, ways, *m]`` (the paper sums K shots)."""
    onehot = F.one_hot(labels, ways).to(maps.dtype).transpose(1, 2)       # [T, ways, S]
    return (onehot @ maps.flatten(2)).reshape(maps.shape[0], ways, *maps.shape[2:])


class RelationNetwork(EncodingLearner):
    name = "relation"
    family = "metric"
    # Checkpoints written before the encoder came from the backbone registry (a bare Sequential).
    renamed_state = {"encoder.": "encoder.features."}

    def __init__(self, encoder: nn.Module, relation: nn.Module, example_dims: int):
        super().__init__(example_dims)
        self.encoder, self.relation = encoder, relation

    def encode(self, x: Tensor) -> Tensor:
        return embed_maps(self.encoder, x)

    def adapt_encoded(self, support_z: Tensor, support_y: Tensor, ways: int) -> Predictor:
        classes = class_sums(support_z, support_y, ways)
        return lambda query_z: self.relate(classes, query_z)

    def relate(self, classes: Tensor, queries: Tensor) -> Tensor:
        """The relation module on ``[T, N, *map]`` and ``[T, Q, *map]`` -> ``[T, Q, N]``; in training
        one task at a time, so that its batch norm sees each task's pairs alone."""
        if self.relation.training and classes.shape[0] > 1:
            return torch.cat([self.relation(c, q) for c, q in zip(classes.split(1), queries.split(1))])
        return self.relation(classes, queries)

    def meta_loss(self, tasks: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        s = tasks.support_x.shape[1]
        maps = self.encode(torch.cat([tasks.support_x, tasks.query_x], 1))
        scores = self.relate(class_sums(maps[:, :s], tasks.support_y, tasks.ways), maps[:, s:])
        loss = F.mse_loss(scores, F.one_hot(tasks.query_y, tasks.ways).to(scores.dtype))
        return loss, self.task_metrics(scores.detach(), tasks.query_y)


@dataclass(frozen=True, kw_only=True)
class RelationOptions(Options):
    section = "learner"
    hidden: int = option(8, low=1, high=1 << 20, role=ARCHITECTURE, doc="units of the relation module's hidden layer")


@register_learner("relation", options=RelationOptions, family="metric",
                  defaults={"model": {"unpooled": 2, "feature_maps": True}},
                  summary="Relation Networks, learned relation module, MSE objective (Sung et al. 2018)")
def _build(config: dict, info: DataInfo) -> RelationNetwork:
    o: RelationOptions = section_options(config, "learner")
    if len(info.example_shape) != 3:
        raise ConfigError("relation networks compare feature maps: use image data and a backbone that returns "
                          "them (model.backbone = \"conv4\" with model.feature_maps = true)")
    encoder = build_backbone(config, info)
    shape = getattr(encoder, "out_shape", None)
    if not getattr(encoder, "feature_maps", False) or shape is None or len(shape) != 3:
        raise ConfigError(f"relation networks compare feature maps, but model.backbone = "
                          f"{config['model']['backbone']!r} returns flat features; use model.backbone = \"conv4\" "
                          "with model.feature_maps = true (the paper: model.unpooled = 2)")
    channels, side, _ = shape
    return RelationNetwork(encoder, RelationModule(channels, side, o.hidden), example_dims=3)
