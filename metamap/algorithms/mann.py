"""Memory-augmented neural network (Santoro, Bartunov, Botvinick, Wierstra & Lillicrap, 2016).

An LSTM controller reads from and writes to an external memory. An episode is presented as a
sequence in which each input comes with the *previous* step's label, so the model must hold
an example in memory until its label arrives and bind the two. Reads are content-based
(softmax of cosine similarities); writes use least-recently-used access (LRUA): each head
writes either to the slot it just read or to a least-used slot, mixed by a learned gate.

Three deviations from the paper's equations, on by default and each switchable off
(``strength = 0``, ``add_vector = false``, ``least_used = "shared"`` give the paper's model,
``configs/reproduce/mann-omniglot-paper.toml``):

* **Key strength** (``strength``): the read weights are ``softmax(beta * cosine)`` with a
  per-head ``beta = 1 + softplus(.)`` emitted by the controller, as in the Neural Turing
  Machine and DNC; ``strength`` is beta's value at initialisation. The paper's plain softmax
  of cosines in [-1, 1] over 128 slots is nearly uniform (the best match weighs at most e^2
  times the worst), so reads return the memory's average and carry too little signal for the
  binding to be learned within a CPU budget.
* **Add vector** (``add_vector``): heads write a vector of their own (NTM's add vector)
  instead of the read key. Reading right after writing the key itself makes each head's
  best match the slot it has just written, i.e. the current input, not an earlier example
  of the same class with its label.
* **Least-used slots per head** (``least_used = "per_head"``): head h writes to the h-th least
  used slot, and those slots are cleared first. The paper (``"shared"``) has one least-used
  vector for all heads, ``w^lu(i) = 1`` on the n least used slots (n = number of reads, here the
  heads), and clears only *the* least used slot before writing; its heads then write copies of
  their keys over the same n slots.

Measured (BENCHMARKS.md, MANN) on a synthetic binding task (random prototypes per episode, 5 x 10
instances, 600 batches of 16, Adam 3e-3), accuracy at the 2nd / 10th presentation: paper's
equations 49 / 50 %, add vector only 60 / 77 %, strength 10 only 73 / 97 %, both 98 / 99.7 %.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metamap.algorithms.base import MetaLearner, Predictor, embed_tasks
from metamap.algorithms.seeding import content_generator, shuffled_order
from metamap.errors import ConfigError
from metamap.options import ARCHITECTURE, Options, option
from metamap.registry import DataInfo, build_backbone, register_learner, section_options
from metamap.tasks.batch import TaskBatch

PRESENTATIONS = (1, 2, 5, 10)
LEAST_USED = ("per_head", "shared")


# -- the memory's equations (B sequences, H heads, N slots of width W) ---------------------------
def read_weights(keys: Tensor, memory: Tensor, strength: Tensor | None = None) -> Tensor:
    """``w^r``: softmax over slots of ``beta * cosine(key, slot)``; ``keys [B, H, W]``, ``memory [B, N, W]``,
    ``strength [B, H, 1]`` (beta; 1 if None) -> ``[B, H, N]``."""
    cos = F.normalize(keys, dim=-1) @ F.normalize(memory, dim=-1).transpose(1, 2)
    return (cos if strength is None else strength * cos).softmax(-1)


def least_used(usage: Tensor, heads: int) -> Tensor:
    """``w^lu``: ``usage [B, N]`` -> ``[B, H, N]``, head h one-hot on the h-th least used slot.

    The paper marks the ``n`` least used slots (n = number of reads); giving each head its own
    one of them keeps heads from writing copies of their keys into the same slots. Ties go to
    the lower slot index, so the choice is deterministic.
    """
    order = usage.argsort(dim=-1, stable=True)[:, :heads]
    return F.one_hot(order, usage.shape[-1]).to(usage.dtype)


def least_used_shared(usage: Tensor, n: int) -> Tensor:
    """The paper's ``w^lu``: ``usage [B, N]`` -> ``[B, N]``, 1 on the ``n`` least used slots
    (``w^u(i) <= m(w^u, n)``, the n-th smallest usage; ties to the lower slot index), else 0."""
    order = usage.argsort(dim=-1, stable=True)[:, :n]
    return F.one_hot(order, usage.shape[-1]).sum(1).to(usage.dtype)


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
    # Default experiment (configs/mann-omniglot-5way.toml): 71.59 % in bf16 against 69.53 % in fp32,
    # at twice the tasks/s (BENCHMARKS.md); the paper-equations variant uses the same operations.
    auto_bf16 = True

    def __init__(self, encoder: nn.Module, example_dims: int, features: int, classes: int, hidden: int = 200,
                 slots: int = 128, width: int = 40, heads: int = 4, gamma: float = 0.95, seed: int = 0,
                 strength: float = 10.0, add_vector: bool = True, least_used: str = "per_head"):
        super().__init__(example_dims)
        if least_used not in LEAST_USED:
            raise ConfigError(f"learner.least_used must be one of {', '.join(LEAST_USED)}, not {least_used!r}")
        self.least_used = least_used
        if heads > slots:
            raise ConfigError(f"learner.heads ({heads}) cannot exceed learner.slots ({slots})")
        if strength != 0 and strength <= 1:
            raise ConfigError(f"learner.strength ({strength}) must exceed 1 (beta = 1 + softplus), "
                              "or be 0 for the paper's reads without a key strength")
        self.encoder, self.classes, self.seed = encoder, classes, seed
        self.slots, self.width, self.heads, self.gamma = slots, width, heads, gamma
        self.controller = nn.LSTMCell(features + classes + heads * width, hidden)
        self.key = nn.Linear(hidden, heads * width)
        self.gate = nn.Linear(hidden, heads)
        self.strength = nn.Linear(hidden, heads) if strength else None
        if self.strength is not None:
            # Start every head at beta = strength: sharp reads from the first step (see the module docstring).
            with torch.no_grad():
                self.strength.bias.fill_(torch.tensor(strength - 1.0).expm1().log().item())
        self.add = nn.Linear(hidden, heads * width) if add_vector else None
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
        if self.least_used == "per_head":
            lu = least_used(s.usage, self.heads)
            cleared = lu.sum(1)                     # each head's slot is cleared before it is written
        else:
            lu = least_used_shared(s.usage, self.heads).unsqueeze(1).expand(b, self.heads, self.slots)
            cleared = least_used_shared(s.usage, 1)     # the paper: "the least used location is set to zero"
        write = write_weights(gate, s.read, lu)
        content = keys if self.add is None else torch.tanh(self.add(h)).view(b, self.heads, self.width)
        memory = s.memory * (1 - cleared).unsqueeze(-1) + write.transpose(1, 2) @ content
        beta = None if self.strength is None else 1 + F.softplus(self.strength(h)).unsqueeze(-1)
        read = read_weights(keys, memory, beta)
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


@dataclass(frozen=True, kw_only=True)
class MANNOptions(Options):
    section = "learner"
    classes: int = option(0, low=0, high=1 << 16, role=ARCHITECTURE,
                          doc="label outputs; 0 = the most ways of episode.ways and eval.ways")
    hidden: int = option(200, low=1, high=1 << 16, role=ARCHITECTURE, doc="LSTM controller units")
    slots: int = option(128, low=1, high=1 << 20, role=ARCHITECTURE, doc="memory slots")
    width: int = option(40, low=1, high=1 << 16, role=ARCHITECTURE, doc="memory slot width")
    heads: int = option(4, low=1, high=1 << 10, role=ARCHITECTURE, doc="read/write heads")
    gamma: float = option(0.95, low=0, high=1, role=ARCHITECTURE, doc="usage decay")
    strength: float = option(10.0, low=0, role=ARCHITECTURE,
                             doc="initial key strength beta (> 1), or 0 for the paper's plain reads")
    add_vector: bool = option(True, role=ARCHITECTURE, doc="heads write an add vector of their own")
    least_used: Literal["per_head", "shared"] = option(
        "per_head", role=ARCHITECTURE, doc="each head its own least-used slot, or the paper's shared ones")

    def check(self) -> None:
        if self.heads > self.slots:
            self.fail(f"learner.heads ({self.heads}) cannot exceed learner.slots ({self.slots})")
        if self.strength != 0 and self.strength <= 1:
            self.fail(f"learner.strength ({self.strength}) must exceed 1 (beta = 1 + softplus), "
                      "or be 0 for the paper's reads without a key strength")


@register_learner("mann", options=MANNOptions, family="model",
                  defaults={"model": {"backbone": "flatten"},
                            "episode": {"ways": 5, "shots": 1, "queries": 9, "tasks_per_batch": 16},
                            "eval": {"ways": [5]}},
                  summary="Memory-augmented neural network: LSTM controller, LRU-access memory (Santoro et al. 2016)")
def _build(config: dict, info: DataInfo) -> MemoryAugmentedNetwork:
    o: MANNOptions = section_options(config, "learner")
    classes = o.classes or max([config["episode"]["ways"], *config["eval"]["ways"]])
    encoder = build_backbone(config, info)
    return MemoryAugmentedNetwork(encoder, len(info.example_shape), encoder.out_features, classes, o.hidden,
                                  o.slots, o.width, o.heads, o.gamma, seed=config["seed"],
                                  strength=o.strength, add_vector=o.add_vector, least_used=o.least_used)
