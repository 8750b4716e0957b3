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
from {0, 1e-4, 1e-3, 1e-2} on a few labelled episodes of the target domain. Deviations: a
shifted image is padded with its own corner value (its background) rather than with 0, which
after normalisation is not the background of a dark image; and the default augmentation
(``eval.finetune_augment``) is the shift alone: on Omniglot -> Fashion-MNIST, 5 shots, 60 test
episodes, fine-tuning (lr 1e-3, 10 steps) gained +10.3 points with shifts alone against +6.9
with P>M>F's flip and colour jitter too, and flips do not keep a character's class.

Before any step, the batch-norm layers' running statistics can be moved towards the support
set's (``eval.finetune_norm``, :func:`adapt_norm_statistics`): covariate-shift adaptation
(Schneider et al., NeurIPS 2020), computed from the support set alone, so each query is still
classified on its own. ``eval.finetune_params = "norm"`` fine-tunes only the normalisation
layers' scales and shifts.

What is left ``"auto"`` -- the statistics' weight, the learning rate, the number of steps, the
weights tuned -- is picked on ``eval.finetune_episodes`` episodes of the target data's
*validation* classes -- never the test classes, which is checked -- at the evaluated ways and
shots (:func:`select`), or given (``eval.finetune_norm``, ``eval.finetune_lr``,
``eval.finetune_steps``). The choice is made in two stages, each keeping the simpler option
(the checkpoint's statistics, then no fine-tuning) unless a candidate's paired per-episode gain
is clearly above 0 (:func:`decide`): on few episodes, the best mean of a dozen candidates is
mostly luck, and a fine-tuning picked by it can lose on the test classes. Every episode
starts from the same weights and statistics, which are restored afterwards: nothing is
written, and the checkpoint on disk is never touched. Augmentation is drawn from
``(eval.seed, episode)``, so the same seed gives the same result.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor

from torch import nn

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
    """Adapt each episode's copy of the weights: first the batch-norm statistics (``norm``, the
    weight of the support set's statistics against the checkpoint's running ones), then
    ``steps`` Adam steps of size ``lr`` on ``params`` ("all" weights, or "norm": the
    normalisation layers' scales and shifts only)."""

    lr: float
    steps: int
    augment: tuple[str, ...] = ("translation",)
    aug_prob: float = 0.9
    seed: int = 0
    norm: float = 0.0
    params: str = "all"


NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def _params(learner, extra: list[Tensor], which: str = "all") -> list[Tensor]:
    if which == "norm":
        own = [p for m in learner.modules() if isinstance(m, NORM_LAYERS)
               for p in m.parameters(recurse=False) if p.requires_grad]
    else:
        own = [p for p in learner.parameters() if p.requires_grad]
    return own + list(extra)


def adapt_norm_statistics(learner, support_x: Tensor, support_y: Tensor, ways: int, weight: float) -> int:
    """Mix the support set's statistics into every batch norm's running ones, in place:
    ``running <- (1 - weight) * running + weight * support`` (mean and unbiased variance per
    channel of the layer's input), layer after layer, so each layer sees its inputs normalised
    by the statistics already mixed below it (Schneider et al. 2020's covariate-shift
    adaptation, from the support set alone). The support set goes once through the learner's
    usual adaptation to collect them; a layer called again keeps its first mix. Returns the
    number of layers adapted (0: the learner has no batch norm with running statistics).
    Call in evaluation mode; the caller restores the buffers."""
    layers = [m for m in learner.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and m.track_running_stats and m.running_mean is not None]
    if weight <= 0 or not layers:
        return 0
    done: set[int] = set()

    def mix(module, inputs):
        if id(module) in done:
            return
        x = inputs[0].detach().float()
        dims = [d for d in range(x.dim()) if d != 1]
        count = x.numel() // x.shape[1]
        mean = x.mean(dims)
        var = x.var(dims, unbiased=count > 1)
        module.running_mean.mul_(1 - weight).add_(weight * mean.to(module.running_mean.dtype))
        module.running_var.mul_(1 - weight).add_(weight * var.to(module.running_var.dtype))
        done.add(id(module))

    hooks = [m.register_forward_pre_hook(mix) for m in layers]
    try:
        with torch.set_grad_enabled(learner.adapts_with_gradients):    # gradient learners adapt by steps
            learner.adapt_tasks(support_x, support_y, ways)
    finally:
        for h in hooks:
            h.remove()
    return len(done)


def trajectory(learner, support_x: Tensor, support_y: Tensor, ways: int, cfg: FineTuning, episode: int = 0,
               at_steps=None) -> Iterator[tuple[int, Callable]]:
    """Fine-tune ``learner`` in place on one task's support set (``[1, S, ...]``); yields
    ``(steps, predictor)`` after each count of ``at_steps`` (default ``[cfg.steps]``). A predictor
    is valid until the next one is yielded; the caller restores the weights (:func:`finetuned`)."""
    generator = episode_generator(cfg.seed, episode)
    adapt_norm_statistics(learner, support_x, support_y, ways, cfg.norm)
    with torch.enable_grad():
        extra, state = learner.finetune_start(support_x, support_y, ways)
        params = _params(learner, extra, cfg.params)
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
    # candidate ("norm=..,lr=..,steps=..") -> its mean score on the selection episodes, its mean paired
    # gain over the choice it had to beat, and the lower end of that gain's 95 % CI
    scores: dict = field(default_factory=dict)
    norm: float = 0.0
    params: str = "all"
    rule: str = "given"

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        what = f"lr {self.lr:g}, {self.steps} steps"
        if self.params != "all" and self.lr > 0:
            what += f" of the {self.params} layers' scales and shifts"
        if self.norm > 0:
            what += f", batch-norm statistics {self.norm:g} from the support set"
        return f"test-time fine-tuning: {what} ({self.chosen_on})"


Z95 = 1.959963984540054


def paired_gain(candidate: Tensor, reference: Tensor) -> tuple[float, float]:
    """Mean per-episode gain of ``candidate`` over ``reference`` (scores ``[K]`` on the same
    episodes, higher is better) and the lower end of its 95 % CI (normal approximation; with
    one episode, the gain itself)."""
    d = (candidate.double() - reference.double())
    mean = float(d.mean())
    half = Z95 * float(d.std()) / len(d) ** 0.5 if len(d) > 1 else 0.0
    return mean, mean - half


def decide(reference: Tensor, candidates: dict, rule: str = "paired"):
    """The key of the candidate to use instead of ``reference``, or None to keep it.

    ``candidates`` maps keys, cheapest first, to per-episode scores ``[K]`` (higher is better).
    ``rule = "paired"``: the candidate whose paired gain has the highest lower 95 % bound, if
    that bound is above 0 -- the reference stays unless a gain is clear on these episodes.
    ``rule = "mean"``: the highest mean score, if above the reference's. Ties go to the
    cheaper candidate (the earlier key)."""
    best, best_value = None, 0.0 if rule == "paired" else float(reference.double().mean())
    for key, scores in candidates.items():
        value = paired_gain(scores, reference)[1] if rule == "paired" else float(scores.double().mean())
        if value > best_value:
            best, best_value = key, value
    return best


def _key(norm: float, lr: float, steps: int, params: str = "all") -> str:
    return f"norm={norm:g},lr={lr:g},steps={steps}" + ("" if params == "all" or lr == 0 else f",params={params}")


def _episode_scores(learner, tasks, ids, cfg: FineTuning, grid) -> list[Tensor]:
    """Per-episode primary scores ``[K]`` (higher is better) after each step count of ``grid``."""
    kind = learner.task_kind(tasks.query_y)
    sign = 1.0 if kind.primary.higher_is_better else -1.0
    return [sign * kind.scores(out, tasks.query_y)[kind.primary.name].double()
            for out in finetune_predictions(learner, tasks, ids, cfg, grid)]


def select(learner, sampler, episodes: int, lrs, steps_grid, base: FineTuning, chosen_on: str,
           norms=(0.0,), params_grid=("all",), rule: str = "paired", given_steps: bool = False,
           given_norm: bool = False) -> Selection:
    """Pick the adaptation on ``episodes`` episodes of ``sampler`` (labelled, never the test classes).

    Two stages, each keeping the simpler choice unless a candidate beats it (:func:`decide`):
    first the batch-norm statistics' weight (``norms``; 0 = the checkpoint's statistics) against
    the learner as it is, then fine-tuning (``lrs`` x ``params_grid`` x ``steps_grid``, the step
    counts read along one run) against the first stage's choice. ``lr = 0`` is no fine-tuning.
    ``given_steps`` with a single learning rate: those values are used, not compared; likewise
    ``given_norm`` with a single weight.
    """
    steps_grid = sorted(set(int(s) for s in steps_grid))
    ids = list(range(episodes))
    tasks = sampler.episodes(ids)
    record: dict[str, dict] = {}
    was = learner.training
    learner.eval()

    def note(key, scores, reference):
        gain, low = paired_gain(scores, reference)
        record[key] = {"score": round(float(scores.mean()), 6), "gain": round(gain, 6), "low": round(low, 6)}

    try:
        seed = base.seed + 1
        plain = _episode_scores(learner, tasks, ids, FineTuning(0.0, 0, seed=seed), [0])[0]
        note(_key(0.0, 0.0, 0), plain, plain)
        stage1 = {}
        for norm in sorted(set(float(w) for w in norms) - {0.0}):
            stage1[norm] = _episode_scores(learner, tasks, ids, FineTuning(0.0, 0, seed=seed, norm=norm), [0])[0]
            note(_key(norm, 0.0, 0), stage1[norm], plain)
        norm = float(norms[0]) if given_norm else decide(plain, stage1, rule) or 0.0
        reference = stage1.get(norm, plain)
        lrs = sorted(set(float(x) for x in lrs) - {0.0})
        stage2 = {}
        for lr in lrs:
            for which in params_grid:
                cfg = FineTuning(lr, max(steps_grid), base.augment, base.aug_prob, seed, norm, which)
                for steps, scores in zip(steps_grid, _episode_scores(learner, tasks, ids, cfg, steps_grid)):
                    stage2[(lr, steps, which)] = scores
                    note(_key(norm, lr, steps, which), scores, reference)
        if given_steps and len(stage2) == 1:
            picked = next(iter(stage2))
        else:
            # cheapest first: fewer steps, then the smaller learning rate, then fewer weights tuned
            order = sorted(stage2, key=lambda k: (k[1], k[0], k[2] != "norm"))
            picked = decide(reference, {k: stage2[k] for k in order}, rule)
    finally:
        learner.train(was)
    lr, steps, which = picked if picked is not None else (0.0, 0, "all")
    return Selection(lr, steps, chosen_on, dict(sorted(record.items())), norm, which, rule)


# -- configuration: the eval.finetune* keys (defaults and validation in metamap/config.py) ---------
enabled, check = finetune_enabled, check_finetune


def base_settings(e: dict) -> FineTuning:
    lr = 0.0 if e["finetune_lr"] == "auto" else float(e["finetune_lr"])
    steps = 0 if e["finetune_steps"] == "auto" else int(e["finetune_steps"])
    norm = 0.0 if e["finetune_norm"] == "auto" else float(e["finetune_norm"])
    params = "all" if e["finetune_params"] == "auto" else e["finetune_params"]
    return FineTuning(lr, steps, tuple(e["finetune_augment"]), float(e["finetune_aug_prob"]), int(e["seed"]),
                      norm, params)


def needs_selection(e: dict) -> bool:
    return "auto" in (e["finetune_lr"], e["finetune_steps"], e["finetune_norm"], e["finetune_params"])


def choose(learner, e: dict, selection_sampler, chosen_on: str) -> tuple[FineTuning, Selection]:
    """The fine-tuning of ``eval``: given values, or picked on ``selection_sampler``'s episodes."""
    base = base_settings(e)
    if not needs_selection(e):
        return base, Selection(base.lr, base.steps, "given", norm=base.norm, params=base.params)
    lrs = e["finetune_lrs"] if e["finetune_lr"] == "auto" else [e["finetune_lr"]]
    grid = e["finetune_steps_grid"] if e["finetune_steps"] == "auto" else [e["finetune_steps"]]
    norms = e["finetune_norms"] if e["finetune_norm"] == "auto" else [e["finetune_norm"]]
    params = ["all", "norm"] if e["finetune_params"] == "auto" else [e["finetune_params"]]
    given = e["finetune_lr"] != "auto" and e["finetune_steps"] != "auto" and e["finetune_params"] != "auto"
    picked = select(learner, selection_sampler, e["finetune_episodes"], lrs, grid, base, chosen_on, norms, params,
                    e["finetune_rule"], given_steps=given, given_norm=e["finetune_norm"] != "auto")
    return FineTuning(picked.lr, picked.steps, base.augment, base.aug_prob, base.seed, picked.norm,
                      picked.params), picked
