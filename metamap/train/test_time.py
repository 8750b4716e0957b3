"""Test-time fine-tuning: an option of the one evaluator (``eval.finetune``) and of ``predict``.

For each test episode, the learner's weights (backbone and everything else it meta-learned)
and any task-specific head (:meth:`MetaLearner.finetune_start`) are fine-tuned on that
episode's support set before it adapts as usual: the loss (:meth:`MetaLearner.finetune_loss`)
is the adapted predictor's cross-entropy on augmented copies of the support examples. For
ProtoNet this is P>M>F's recipe (Hu et al., CVPR 2022, and the authors' code): prototypes from
the plain support set, recomputed with the current weights at every step, pseudo-queries made
by DiffAugment-style augmentation (with probability 0.9 per step: a horizontal flip of the whole
batch half the time, then per-image brightness, saturation and contrast jitter and a shift by up
to 1/8 of the side), Adam (0.9, 0.999) without weight decay, 50 steps, the learning rate picked
from {0, 1e-4, 1e-3, 1e-2} on a few labelled episodes of the target domain. Deviation: a shifted
image is padded with its own corner value (its background) rather than with 0, which after
normalisation is not the background of a dark image.

The learning rate and the number of steps are picked (``"auto"``) on ``eval.finetune_episodes``
episodes of the target data's *validation* classes -- never the test classes, which is
checked -- at the evaluated ways and shots, or given (``eval.finetune_lr``,
``eval.finetune_steps``). Every episode starts from the same weights, which are restored
afterwards: nothing is written, and the checkpoint on disk is never touched. Augmentation is
drawn from ``(eval.seed, episode)``, so the same seed gives the same result.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor

from metamap.config import FINETUNE_AUGMENTATIONS as AUGMENTATIONS
from metamap.config import check_finetune, finetune_enabled


def augment(x: Tensor, generator: torch.Generator, kinds=AUGMENTATIONS, prob: float = 0.9) -> Tensor:
    """P>M>F's support-set augmentation, ``x [N, C, H, W]`` -> same shape (see the module docstring)."""
    def rand(*shape):
        return torch.rand(shape, generator=generator).to(x.device, x.dtype)
    if float(torch.rand((), generator=generator)) >= prob:
        return x
    n = x.shape[0]
    if "flip" in kinds and float(torch.rand((), generator=generator)) < 0.5:
        x = x.flip(-1)
    if "color" in kinds:
        x = x + (rand(n, 1, 1, 1) - 0.5)                                       # brightness
        mean = x.mean(1, keepdim=True)
        x = (x - mean) * (2 * rand(n, 1, 1, 1)) + mean                         # saturation (none for grey)
        mean = x.mean((1, 2, 3), keepdim=True)
        x = (x - mean) * (rand(n, 1, 1, 1) + 0.5) + mean                       # contrast
    if "translation" in kinds:
        x = translate(x, generator)
    return x


def translate(x: Tensor, generator: torch.Generator, ratio: float = 0.125) -> Tensor:
    """Shift each image by whole pixels, up to ``ratio`` of its side, filling with its corner value."""
    n, _, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sy, sy + 1, (n,), generator=generator)
    dx = torch.randint(-sx, sx + 1, (n,), generator=generator)
    pad = max(sy, sx)
    padded = x[:, :, :1, :1].expand(-1, -1, h + 2 * pad, w + 2 * pad).clone()      # the corner: background
    padded[:, :, pad:pad + h, pad:pad + w] = x
    rows = (torch.arange(h).view(1, h) + pad - dy.view(n, 1)).to(x.device)             # [n, h]
    cols = (torch.arange(w).view(1, w) + pad - dx.view(n, 1)).to(x.device)             # [n, w]
    idx = torch.arange(n, device=x.device).view(n, 1, 1)
    return padded.permute(0, 2, 3, 1)[idx, rows.unsqueeze(2), cols.unsqueeze(1)].permute(0, 3, 1, 2)


def episode_generator(seed: int, episode: int, tag: int = 0) -> torch.Generator:
    state = np.random.SeedSequence([int(seed), int(episode), int(tag)]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


@dataclass
class FineTuning:
    """Fine-tune each episode's copy of the weights for ``steps`` Adam steps of size ``lr``."""

    lr: float
    steps: int
    augment: tuple[str, ...] = AUGMENTATIONS
    aug_prob: float = 0.9
    seed: int = 0


def _params(learner, extra: list[Tensor]) -> list[Tensor]:
    return [p for p in learner.parameters() if p.requires_grad] + list(extra)


def trajectory(learner, support_x: Tensor, support_y: Tensor, ways: int, cfg: FineTuning, episode: int = 0,
               at_steps=None) -> Iterator[tuple[int, Callable]]:
    """Fine-tune ``learner`` in place on one task's support set (``[1, S, ...]``); yields
    ``(steps, predictor)`` after each count of ``at_steps`` (default ``[cfg.steps]``). A predictor
    is valid until the next one is yielded; the caller restores the weights (:func:`finetuned`)."""
    generator = episode_generator(cfg.seed, episode)
    with torch.enable_grad():
        extra, state = learner.finetune_start(support_x, support_y, ways)
        params = _params(learner, extra)
        opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0) if cfg.lr > 0 else None
        done = 0
        for target in sorted(set(at_steps or [cfg.steps])):
            while opt is not None and done < target:
                pseudo = augment(support_x[0], generator, cfg.augment, cfg.aug_prob).unsqueeze(0)
                opt.zero_grad(set_to_none=True)
                learner.finetune_loss(support_x, support_y, pseudo, ways, state).backward()
                opt.step()
                done += 1
            predict = learner.finetuned_predictor(support_x, support_y, ways, state)

            def predictor(query_x: Tensor, predict=predict) -> Tensor:
                with torch.set_grad_enabled(learner.adapts_with_gradients):
                    return predict(query_x).detach().float()
            yield target, predictor


@contextmanager
def finetuned(learner, support_x: Tensor, support_y: Tensor, ways: int, cfg: FineTuning, episode: int = 0):
    """``with finetuned(...) as predictor:`` the learner fine-tuned on one support set; its weights
    are put back as they were when the block ends, whatever happens in it."""
    saved = {k: v.detach().clone() for k, v in learner.state_dict().items()}
    try:
        yield next(trajectory(learner, support_x, support_y, ways, cfg, episode))[1]
    finally:
        learner.load_state_dict(saved)


def finetune_predictions(learner, tasks, episodes: list[int], cfg: FineTuning, at_steps=None) -> list[Tensor]:
    """Query outputs ``[T, Q, ways]`` after fine-tuning each task of ``tasks`` on its own support set.

    ``at_steps``: step counts; one output tensor per count, from one fine-tuning run per task.
    The learner's weights are the same before and after.
    """
    at_steps = sorted(set(at_steps or [cfg.steps]))
    saved = {k: v.detach().clone() for k, v in learner.state_dict().items()}
    outputs: list[list[Tensor]] = [[] for _ in at_steps]
    try:
        for i, episode in enumerate(episodes):
            task = tasks.task(i)
            for k, (_, predictor) in enumerate(trajectory(learner, task.support_x, task.support_y, task.ways, cfg,
                                                          episode, at_steps)):
                outputs[k].append(predictor(task.query_x))
            learner.load_state_dict(saved)
    finally:
        learner.load_state_dict(saved)
    return [torch.cat(o) for o in outputs]


@dataclass
class Selection:
    """What the automatic choice tried and picked (printed and recorded with the results)."""

    lr: float
    steps: int
    chosen_on: str
    scores: dict = field(default_factory=dict)      # "lr=..,steps=.." -> mean score on the selection episodes

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return f"test-time fine-tuning: lr {self.lr:g}, {self.steps} steps ({self.chosen_on})"


def select(learner, sampler, episodes: int, lrs, steps_grid, base: FineTuning, chosen_on: str) -> Selection:
    """Pick ``(lr, steps)`` by the mean query score (accuracy) on ``episodes`` episodes of ``sampler``.

    Ties go to the smaller learning rate, then to fewer steps (the cheaper, the closer to the
    learner as meta-trained). ``lr = 0`` is the learner without fine-tuning.
    """
    steps_grid = sorted(set(int(s) for s in steps_grid))
    ids = list(range(episodes))
    tasks = sampler.episodes(ids)
    scores: dict[tuple[float, int], float] = {}
    was = learner.training
    learner.eval()
    try:
        for lr in sorted(set(float(x) for x in lrs)):
            cfg = FineTuning(lr, max(steps_grid), base.augment, base.aug_prob, base.seed + 1)
            grid = [0] if lr == 0 else steps_grid
            outs = finetune_predictions(learner, tasks, ids, cfg, grid)
            kind = learner.task_kind(tasks.query_y)
            for steps, out in zip(grid, outs):
                value = float(kind.scores(out, tasks.query_y)[kind.primary.name].mean())
                scores[(lr, steps)] = value if kind.primary.higher_is_better else -value
    finally:
        learner.train(was)
    best = max(scores, key=lambda k: (scores[k], -k[0], -k[1]))
    return Selection(best[0], best[1] if best[0] > 0 else 0, chosen_on,
                     {f"lr={lr:g},steps={s}": round(v, 6) for (lr, s), v in sorted(scores.items())})


# -- configuration: the eval.finetune* keys (defaults and validation in metamap/config.py) ---------
enabled, check = finetune_enabled, check_finetune


def base_settings(e: dict) -> FineTuning:
    lr = 0.0 if e["finetune_lr"] == "auto" else float(e["finetune_lr"])
    steps = 0 if e["finetune_steps"] == "auto" else int(e["finetune_steps"])
    return FineTuning(lr, steps, tuple(e["finetune_augment"]), float(e["finetune_aug_prob"]), int(e["seed"]))


def needs_selection(e: dict) -> bool:
    return e["finetune_lr"] == "auto" or e["finetune_steps"] == "auto"


def choose(learner, e: dict, selection_sampler, chosen_on: str) -> tuple[FineTuning, Selection]:
    """The fine-tuning of ``eval``: given values, or picked on ``selection_sampler``'s episodes."""
    base = base_settings(e)
    if not needs_selection(e):
        return base, Selection(base.lr, base.steps, "given")
    lrs = e["finetune_lrs"] if e["finetune_lr"] == "auto" else [e["finetune_lr"]]
    grid = e["finetune_steps_grid"] if e["finetune_steps"] == "auto" else [e["finetune_steps"]]
    picked = select(learner, selection_sampler, e["finetune_episodes"], lrs, grid, base, chosen_on)
    return FineTuning(picked.lr, picked.steps, base.augment, base.aug_prob, base.seed), picked
