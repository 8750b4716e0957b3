"""Memory-augmented neural network (Santoro, Bartunov, Botvinick, Wierstra & Lillicrap, 2016).

An LSTM controller reads from and writes to an external memory. An episode is presented as a
sequence in which each input comes with the *previous* step's label, so the model must hold
an example in memory until its label arrives and bind the two. Reads are content-based
(softmax of cosine similarities); writes use least-recently-used access (LRUA): each head
writes either to the slot it just read or to a least-used slot, mixed by a learned gate.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metamap.algorithms.base import MetaLearner, Predictor, embed_tasks
from metamap.algorithms.seeding import content_generator, shuffled_order
from metamap.errors import ConfigError
from metamap.registry import DataInfo, build_backbone, options, register_backbone, register_learner
from metamap.tasks.batch import TaskBatch

PRESENTATIONS = (1, 2, 5, 10)


# -- the memory's equations (B sequences, H heads, N slots of width W) ---------------------------
def read_weights(keys: Tensor, memory: Tensor) -> Tensor:
    """``w^r``: softmax over slots of cosine(key, slot); ``keys [B, H, W]``, ``memory [B, N, W]`` -> ``[B, H, N]``."""
    return (F.normalize(keys, dim=-1) @ F.normalize(memory, dim=-1).transpose(1, 2)).softmax(-1)


def least_used(usage: Tensor, heads: int) -> Tensor:
    """``w^lu``: ``usage [B, N]`` -> ``[B, H, N]``, head h one-hot on the h-th least used slot.

    The paper marks the ``n`` least used slots (n = number of reads); giving each head its own
    one of them keeps heads from writing copies of their keys into the same slots. Ties go to
    the lower slot index, so the choice is deterministic.
    """
    order = usage.argsort(dim=-1, stable=True)[:, :heads]
    return F.one_hot(order, usage.shape[-1]).to(usage.dtype)


def write_weights(gate: Tensor, previous_read: Tensor, previous_least_used: Tensor) -> Tensor:
    """``w^w = sigmoid(alpha) w^r_{t-1} + (1 - sigmoid(alpha)) w^lu_{t-1}``; ``gate [B, H, 1]`` is sigmoid(alpha)."""
    return gate * previous_read + (1 - gate) * previous_least_used


def updated_usage(usage: Tensor, read: Tensor, write: Tensor, gamma: float) -> Tensor:
    """``w^u_t = gamma w^u_{t-1} + w^r_t + w^w_t`` (summed over heads) -> ``[B, N]``."""
    return gamma * usage + read.sum(1) + write.sum(1)


@dataclass
class MemoryState:
    """Everything carried from one step to the next (leading dimension B)."""

    memory: Tensor        # [B, N, W]
    usage: Tensor         # [B, N]
    read: Tensor          # [B, H, N]  last read weights
    reads: Tensor         # [B, H*W]   last read vectors
    h: Tensor             # [B, hidden] controller state
    c: Tensor

    def repeat(self, n: int) -> MemoryState:
        """Each sequence's state ``n`` times over (``[B*n, ...]``), to run queries independently."""
        return MemoryState(*(getattr(self, f.name).repeat_interleave(n, 0) for f in fields(self)))


class MemoryAugmentedNetwork(MetaLearner):
    name = "mann"
    family = "model"

    def __init__(self, encoder: nn.Module, example_dims: int, features: int, classes: int, hidden: int = 200,
                 slots: int = 128, width: int = 40, heads: int = 4, gamma: float = 0.95, seed: int = 0):
        super().__init__(example_dims)
        if heads > slots:
            raise ConfigError(f"learner.heads ({heads}) cannot exceed learner.slots ({slots})")
        self.encoder, self.classes, self.seed = encoder, classes, seed
        self.slots, self.width, self.heads, self.gamma = slots, width, heads, gamma
        self.controller = nn.LSTMCell(features + classes + heads * width, hidden)
        self.key = nn.Linear(hidden, heads * width)
        self.gate = nn.Linear(hidden, heads)
        self.out = nn.Linear(hidden + heads * width, classes)

    def initial_state(self, b: int, like: Tensor) -> MemoryState:
        # A tiny constant memory keeps the first cosine similarities defined.
        n, hidden = self.heads * self.width, self.controller.hidden_size
        return MemoryState(like.new_full((b, self.slots, self.width), 1e-6), like.new_zeros(b, self.slots),
                           like.new_zeros(b, self.heads, self.slots), like.new_zeros(b, n),
                           like.new_zeros(b, hidden), like.new_zeros(b, hidden))

    def step(self, x: Tensor, previous_label: Tensor, s: MemoryState) -> tuple[Tensor, MemoryState]:
        """One time step: ``x [B, F]``, ``previous_label [B, classes]`` -> logits ``[B, classes]``, new state."""
        b = x.shape[0]
        h, c = self.controller(torch.cat([x, previous_label, s.reads], -1), (s.h, s.c))
        keys = torch.tanh(self.key(h)).view(b, self.heads, self.width)
        gate = torch.sigmoid(self.gate(h)).unsqueeze(-1)
        lu = least_used(s.usage, self.heads)
        write = write_weights(gate, s.read, lu)
        # The least used slots are cleared before they are written to.
        memory = s.memory * (1 - lu.sum(1)).unsqueeze(-1) + write.transpose(1, 2) @ keys
        read = read_weights(keys, memory)
        reads = (read @ memory).flatten(1)
        state = MemoryState(memory, updated_usage(s.usage, read, write, self.gamma), read, reads, h, c)
        return self.out(torch.cat([h, reads], -1)), state

    def run(self, x: Tensor, labels: Tensor) -> tuple[Tensor, MemoryState]:
        """``x [T, L, *example]`` with labels ``[T, L]`` shown one step late -> logits ``[T, L, classes]``."""
        z = embed_tasks(self.encoder, x)
        previous = F.pad(F.one_hot(labels, self.classes)[:, :-1], (0, 0, 1, 0)).to(z.dtype)
        state, logits = self.initial_state(x.shape[0], z), []
        for t in range(x.shape[1]):
            out, state = self.step(z[:, t], previous[:, t], state)
            logits.append(out)
        return torch.stack(logits, 1), state

    def check_ways(self, ways: int) -> None:
        if ways > self.classes:
            raise ConfigError(f"this MANN has {self.classes} label outputs and cannot do {ways}-way tasks; "
                              "train one with learner.classes >= ways")

    def adapt_tasks(self, support_x: Tensor, support_y: Tensor, ways: int) -> Predictor:
        self.check_ways(ways)
        t, s = support_y.shape
        order = shuffled_order(content_generator(self.seed, support_x), t, s).to(support_y.device)
        tasks = torch.arange(t, device=support_y.device).unsqueeze(1)
        support_y = support_y[tasks, order]
        _, state = self.run(support_x[tasks, order], support_y)
        last = F.one_hot(support_y[:, -1], self.classes)

        def predict(query_x: Tensor) -> Tensor:
            # Each query is the next step after the support sequence, independently of the others.
            q = query_x.shape[1]
            z = embed_tasks(self.encoder, query_x).flatten(0, 1)
            logits, _ = self.step(z, last.repeat_interleave(q, 0).to(z.dtype), state.repeat(q))
            return logits.view(t, q, -1)[..., :ways]
        return predict

    def sequence_outputs(self, tasks: TaskBatch) -> tuple[Tensor, Tensor, Tensor]:
        """The episode as one shuffled sequence -> logits ``[T, L, ways]``, labels ``[T, L]`` and
        presentation numbers ``[T, L]`` (1 for the first time a class appears, 2 for the second...)."""
        self.check_ways(tasks.ways)
        x = torch.cat([tasks.support_x, tasks.query_x], 1)
        y = torch.cat([tasks.support_y, tasks.query_y], 1)
        t, length = y.shape
        order = shuffled_order(content_generator(self.seed, tasks.support_x), t, length).to(y.device)
        rows = torch.arange(t, device=y.device).unsqueeze(1)
        x, y = x[rows, order], y[rows, order]
        logits, _ = self.run(x, y)
        return logits[..., :tasks.ways], y, presentation_numbers(y, tasks.ways)

    def meta_loss(self, tasks: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        logits, y, presentation = self.sequence_outputs(tasks)
        metrics = presentation_accuracy(logits.detach(), y, presentation)
        metrics = {"accuracy": float((logits.argmax(-1) == y).float().mean()),
                   **{f"acc@{k}": v for k, v in metrics.items()}}
        return self.query_loss(logits, y), metrics


def presentation_numbers(labels: Tensor, ways: int) -> Tensor:
    """``labels [T, L]`` -> ``[T, L]``: how many times each step's class has been shown so far, this one included."""
    return F.one_hot(labels, ways).cumsum(1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def presentation_accuracy(logits: Tensor, labels: Tensor, presentation: Tensor,
                          which: tuple[int, ...] = PRESENTATIONS) -> dict[int, float]:
    """Accuracy at the k-th presentation of a class, for each ``k`` in ``which`` that occurs."""
    correct = logits.argmax(-1) == labels
    return {k: float(correct[presentation == k].float().mean()) for k in which if bool((presentation == k).any())}


class Flatten(nn.Module):
    """Examples as flat vectors: MANN's paper feeds raw pixels, with no convolutions."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


@register_backbone("flatten")
def _flatten(cfg: dict, info: DataInfo) -> Flatten:
    # The conv settings of the default [model] section mean nothing here; accept and ignore them.
    options(cfg, {"hidden": 0, "layers": 0, "norm": True}, "model")
    return Flatten(int(torch.tensor(info.example_shape).prod()))


@register_learner("mann", family="model",
                  defaults={"model": {"backbone": "flatten"},
                            "episode": {"ways": 5, "shots": 1, "queries": 9, "tasks_per_batch": 16},
                            "eval": {"ways": [5]}},
                  summary="Memory-augmented neural network: LSTM controller, LRU-access memory (Santoro et al. 2016)")
def _build(config: dict, info: DataInfo) -> MemoryAugmentedNetwork:
    o = options(config["learner"], {"classes": 0, "hidden": 200, "slots": 128, "width": 40, "heads": 4,
                                    "gamma": 0.95}, "learner")
    eval_ways = config["eval"]["ways"] if isinstance(config["eval"]["ways"], list) else [config["eval"]["ways"]]
    classes = o["classes"] or max([config["episode"]["ways"], *eval_ways])
    encoder = build_backbone(config, info)
    return MemoryAugmentedNetwork(encoder, len(info.example_shape), encoder.out_features, classes, o["hidden"],
                                  o["slots"], o["width"], o["heads"], float(o["gamma"]), seed=config["seed"])
