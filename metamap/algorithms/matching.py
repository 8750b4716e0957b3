"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, 2016).

A query attends over the support set with a softmax of cosine similarities; its predicted
class distribution is the attention mass on each class. With full-context embeddings (FCE)
the support embeddings are read in the context of the whole support set (a bidirectional
LSTM), and each query embedding is refined by a few steps of an attention LSTM over them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metamap.algorithms.base import EncodingLearner, Predictor
from metamap.options import ARCHITECTURE, MAX_STEP, Options, option
from metamap.registry import DataInfo, build_backbone, register_learner, section_options
from metamap.tasks.batch import TaskBatch


def cosine_similarities(queries: Tensor, support: Tensor) -> Tensor:
    """``queries [T, Q, D]``, ``support [T, S, D]`` -> cosine similarities ``[T, Q, S]``."""
    return F.normalize(queries, dim=-1) @ F.normalize(support, dim=-1).transpose(1, 2)


def class_log_attention(scores: Tensor, labels: Tensor, ways: int) -> Tensor:
    """``log sum_{i: y_i = c} softmax(scores)_i``: ``scores [T, Q, S]``, ``labels [T, S]`` -> ``[T, Q, ways]``.

    This is the log of the paper's prediction ``sum_i a(x, x_i) y_i``, so cross-entropy on it
    is exactly the paper's negative log-likelihood; log-sum-exp keeps it stable.
    """
    member = F.one_hot(labels, ways).transpose(1, 2).bool()               # [T, ways, S]
    log_attention = scores.log_softmax(-1).unsqueeze(2)                    # [T, Q, 1, S]
    return log_attention.masked_fill(~member.unsqueeze(1), float("-inf")).logsumexp(-1)


class FullContextEmbedding(nn.Module):
    """The FCE functions ``g(x_i, S)`` (support) and ``f(x, S)`` (queries) for ``dim``-sized embeddings.

    The paper feeds the attention LSTM the concatenation ``[h, r]`` but then adds ``h`` to a
    ``dim``-sized input, which only type-checks if the state is ``dim``-sized; like most
    implementations we add the read-out to the state instead of concatenating it.
    """

    def __init__(self, dim: int, steps: int = 5):
        super().__init__()
        self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
        self.query_cell = nn.LSTMCell(dim, dim)
        self.steps = steps

    def support(self, g: Tensor) -> Tensor:
        """``g [T, S, D]`` -> ``g + forward + backward`` LSTM states, ``[T, S, D]``."""
        out, _ = self.support_lstm(g)
        forward, backward = out.chunk(2, dim=-1)
        return g + forward + backward

    def query(self, f: Tensor, g: Tensor) -> Tensor:
        """``f [T, Q, D]`` refined by ``steps`` reads of the support embeddings ``g [T, S, D]``."""
        t, q, d = f.shape
        x = f.reshape(t * q, d)
        h, c = torch.zeros_like(x), torch.zeros_like(x)
        for _ in range(self.steps):
            attention = (h.view(t, q, d) @ g.transpose(1, 2)).softmax(-1)     # [T, Q, S]
            readout = (attention @ g).reshape(t * q, d)
            h, c = self.query_cell(x, (h + readout, c))
            h = h + x
        return h.view(t, q, d)


class MatchingNetwork(EncodingLearner):
    name = "matching"
    family = "metric"

    @property
    def auto_bf16(self) -> bool:
        # Measured on the default experiment (cosine attention, no FCE): 92.58 / 79.89 % in bf16
        # against 91.87 / 78.78 % in fp32 (BENCHMARKS.md); the FCE's LSTMs were not measured.
        return self.fce is None

    def __init__(self, encoder: nn.Module, example_dims: int, fce: FullContextEmbedding | None = None,
                 scale: float = 1.0):
        super().__init__(example_dims)
        self.encoder, self.fce, self.scale = encoder, fce, scale

    def log_probs(self, support_z: Tensor, support_y: Tensor, query_z: Tensor, ways: int) -> Tensor:
        """Embeddings ``[T, S, D]``, ``[T, Q, D]`` -> log class probabilities ``[T, Q, ways]``."""
        if self.fce is not None:
            support_z = self.fce.support(support_z)
            query_z = self.fce.query(query_z, support_z)
        # scale = 1 is the paper's softmax over raw cosines; a larger scale sharpens the attention.
        return class_log_attention(self.scale * cosine_similarities(query_z, support_z), support_y, ways)

    def adapt_encoded(self, support_z: Tensor, support_y: Tensor, ways: int) -> Predictor:
        # With FCE too: the CNN encodes each example alone; the LSTMs run on its codes here.
        return lambda query_z: self.log_probs(support_z, support_y, query_z, ways)

    def meta_loss(self, tasks: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        # One encoder pass over the whole episode, so BatchNorm sees support and queries together.
        s = tasks.support_x.shape[1]
        z = self.encode(torch.cat([tasks.support_x, tasks.query_x], 1))
        log_probs = self.log_probs(z[:, :s], tasks.support_y, z[:, s:], tasks.ways)
        return self.query_loss(log_probs, tasks.query_y), self.task_metrics(log_probs.detach(), tasks.query_y)


@dataclass(frozen=True, kw_only=True)
class MatchingOptions(Options):
    section = "learner"
    fce: bool = option(False, role=ARCHITECTURE, doc="full-context embeddings (LSTMs over the support set)")
    fce_steps: int = option(5, low=0, high=1000, role=ARCHITECTURE, doc="attention LSTM steps per query (FCE)")
    scale: float = option(1.0, low=0, low_open=True, high=MAX_STEP, role=ARCHITECTURE,
                          doc="cosine similarities times this before the softmax; 1 = the paper")


@register_learner("matching", options=MatchingOptions, family="metric",
                  summary="Matching Networks, cosine attention, optional full-context embeddings (Vinyals et al. 2016)")
def _build(config: dict, info: DataInfo) -> MatchingNetwork:
    o: MatchingOptions = section_options(config, "learner")
    encoder = build_backbone(config, info)
    fce = FullContextEmbedding(encoder.out_features, o.fce_steps) if o.fce else None
    return MatchingNetwork(encoder, example_dims=len(info.example_shape), fce=fce, scale=o.scale)
