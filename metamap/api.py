"""The Python API: every learner around your own ``nn.Module``, and ``fit``/``evaluate``.

Each constructor takes your network and the learner's options as keywords, named and checked
exactly like the ``[learner]`` keys of a config (the learner's options dataclass, e.g.
:class:`~metamap.algorithms.gradient.GradientOptions`, is the single source of both)::

    learner = metamap.MAML(my_cnn, inner_lr=0.4, inner_steps=1)
    learner = metamap.ProtoNet(my_encoder)
    learner = metamap.MAMLTRPO(my_policy_mean, env="navigation2d", inner_lr=0.1)

:func:`fit` meta-trains through the same :class:`~metamap.train.trainer.Trainer` as ``metamap
train`` and :func:`evaluate` scores through the same evaluator as ``metamap eval``.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from metamap.errors import ConfigError
from metamap.registry import plugin, plugins


# -- learners ----------------------------------------------------------------------------------
def learner_options(name: str, options: dict):
    """The checked options of learner ``name`` (raises :class:`ConfigError` naming a bad one)."""
    return plugin("learner", name).options.from_section(options)


def infer_example_dims(module: nn.Module, example_shape=None, example_dims: int | None = None) -> int:
    """Dimensions of one example: given, from ``example_shape``, from the module's ``example_dims``
    attribute, or from its first layer (Conv2d: images ``[C, H, W]``; Linear: vectors)."""
    if example_dims is not None:
        return int(example_dims)
    if example_shape is not None:
        return len(example_shape)
    if isinstance(getattr(module, "example_dims", None), int):
        return module.example_dims
    kinds = {nn.Conv1d: 2, nn.Conv2d: 3, nn.Conv3d: 4, nn.Linear: 1}
    for m in module.modules():
        for kind, dims in kinds.items():
            if isinstance(m, kind):
                return dims
    raise ConfigError(f"cannot tell how many dimensions one example of {type(module).__name__} has; give "
                      "example_dims=3 for images [C, H, W] (1 for feature vectors) or example_shape=(C, H, W)")


def infer_features(module: nn.Module, example_shape=None, features: int | None = None) -> int:
    """The size of ``module``'s output features: given, its ``out_features``, or measured on
    ``example_shape`` (one forward pass of two zero examples in evaluation mode)."""
    if features is not None:
        return int(features)
    if isinstance(getattr(module, "out_features", None), int):
        return module.out_features
    if example_shape is None:
        raise ConfigError(f"cannot tell the feature size of {type(module).__name__}; give features=N (its "
                          "output size) or example_shape=(C, H, W) to measure it")
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros(2, *example_shape))
    finally:
        module.train(was)
    return int(out[0].numel())


def _built(learner, name: str, options):
    learner.name, learner.options = name, options
    return learner


def build(name: str, *, example_shape, ways: int = 5, problem: str = "classification", num_train_classes: int = 0,
          output_dim: int = 1, seed: int = 0, model: dict | None = None, data: dict | None = None, **options):
    """Any registered learner (one of ``metamap learners``, or one a new module registers) with its
    built-in network, exactly as ``metamap train`` builds it: ``options`` are its ``[learner]``
    keys, ``model`` its ``[model]`` section (backbone, hidden, ...), ``data`` a ``[data]`` section
    for learners that read one (the meta-RL task family). ``example_shape``, ``problem`` (the task
    kind), ``num_train_classes`` and ``output_dim`` describe the data, as a data source would.
    The weights start from ``seed`` without touching the caller's random state.

    The named constructors (:func:`MAML`, :func:`ProtoNet`, ...) wrap your own modules instead;
    this is the way in for a learner that has none."""
    from metamap import config as configlib
    from metamap.registry import DataInfo, build_learner, section_options
    plugin("learner", name)                      # an unknown name lists the choices
    user = {"seed": seed, "learner": {"name": name, **options}, "episode": {"ways": ways}}
    if model is not None:
        user["model"] = dict(model)
    if data is not None:
        user["data"] = dict(data)
    config = configlib.resolve(base=user)
    info = DataInfo(tuple(example_shape), problem, num_train_classes, output_dim)
    learner = _seeded(config["seed"], lambda: build_learner(config, info))
    return _built(learner, name, section_options(config, "learner"))


def _gradient(name: str, body: nn.Module, head: nn.Module, example_shape, example_dims, ways, seed, options):
    from metamap.algorithms.gradient import GradientLearner, Reptile
    o = learner_options(name, options)
    cls = Reptile if name == "reptile" else GradientLearner
    dims = infer_example_dims(body, example_shape, example_dims)
    return _built(cls(body, head, dims, ways=ways or 0, seed=seed, **o.to_dict()), name, o)


def MAML(model: nn.Module, *, ways: int | None = None, example_shape=None, example_dims: int | None = None,
         seed: int = 0, **options):
    """MAML around ``model`` (inputs -> ``ways`` logits, or regression outputs): every trainable
    weight adapts; a weight with ``requires_grad = False`` stays frozen (neither adapts nor learns).
    ``ways``: the number of classes, if ``model`` is for one (checked at every adaptation).
    Options: those of ``[learner]`` for ``name = "maml"`` (inner_steps, inner_steps_eval, inner_lr,
    first_order, step_sizes, adapt, freeze, bn, ...)."""
    return _gradient("maml", model, nn.Identity(), example_shape, example_dims, ways, seed, options)


def FOMAML(model: nn.Module, *, ways: int | None = None, example_shape=None, example_dims: int | None = None,
           seed: int = 0, **options):
    """First-order MAML (``first_order = true`` by default); see :func:`MAML`."""
    return _gradient("fomaml", model, nn.Identity(), example_shape, example_dims, ways, seed, options)


def MetaSGD(model: nn.Module, *, ways: int | None = None, example_shape=None, example_dims: int | None = None,
            seed: int = 0, **options):
    """Meta-SGD: a learned step size per weight (``step_sizes = "per_element"``); see :func:`MAML`."""
    return _gradient("metasgd", model, nn.Identity(), example_shape, example_dims, ways, seed, options)


def Reptile(model: nn.Module, *, ways: int | None = None, example_shape=None, example_dims: int | None = None,
            seed: int = 0, **options):
    """Reptile with its paper's recipe as defaults (5 Adam inner steps of 1e-3 on mini-batches of
    10, 50 at evaluation on mini-batches of 5); the outer update moves the initialisation toward
    the adapted weights. :func:`fit` then uses its outer recipe too (SGD of step 1 annealed
    linearly to 0, 10-shot tasks, meta-batch 5), as ``metamap train`` does."""
    return _gradient("reptile", model, nn.Identity(), example_shape, example_dims, ways, seed, options)


def ANIL(body: nn.Module, head: nn.Module, *, ways: int | None = None, example_shape=None,
         example_dims: int | None = None, seed: int = 0, **options):
    """ANIL: only ``head`` adapts; ``body`` (features) is meta-learned. ``head`` maps the body's
    features to logits; see :func:`MAML` for the rest."""
    return _gradient("anil", body, head, example_shape, example_dims, ways, seed, options)


def ProtoNet(encoder: nn.Module, *, example_shape=None, example_dims: int | None = None):
    """Prototypical Networks around ``encoder`` (examples -> embeddings ``[B, D]``)."""
    from metamap.algorithms.protonet import PrototypicalNetwork
    o = learner_options("protonet", {})
    return _built(PrototypicalNetwork(encoder, infer_example_dims(encoder, example_shape, example_dims)),
                  "protonet", o)


def MatchingNet(encoder: nn.Module, *, features: int | None = None, example_shape=None,
                example_dims: int | None = None, **options):
    """Matching Networks around ``encoder``; options ``fce``, ``fce_steps``, ``scale``. With
    ``fce = True`` the embedding size is needed: ``features=`` or ``example_shape=``."""
    from metamap.algorithms.matching import FullContextEmbedding, MatchingNetwork
    o = learner_options("matching", options)
    fce = FullContextEmbedding(infer_features(encoder, example_shape, features), o.fce_steps) if o.fce else None
    dims = infer_example_dims(encoder, example_shape, example_dims)
    return _built(MatchingNetwork(encoder, dims, fce=fce, scale=o.scale), "matching", o)


def Siamese(encoder: nn.Module, *, features: int | None = None, example_shape=None,
            example_dims: int | None = None, seed: int = 0, **options):
    """Siamese networks around ``encoder``; options ``loss`` (contrastive | bce), ``margin``, ``pairs``."""
    from metamap.algorithms.siamese import SiameseNetwork
    o = learner_options("siamese", options)
    size = infer_features(encoder, example_shape, features) if o.loss == "bce" else 0
    dims = infer_example_dims(encoder, example_shape, example_dims)
    return _built(SiameseNetwork(encoder, dims, size, o.loss, o.margin, o.pairs, seed=seed), "siamese", o)


def RelationNet(encoder: nn.Module, *, map_shape=None, example_shape=None, relation: nn.Module | None = None,
                **options):
    """Relation Networks around ``encoder`` (images -> feature maps ``[B, C, H, W]``).

    The relation module is the paper's (option ``hidden``), sized from ``map_shape = (C, H, W)``
    or measured on ``example_shape``; or give your own ``relation(classes, queries) -> scores``.
    """
    from metamap.algorithms.relation import RelationModule, RelationNetwork
    o = learner_options("relation", options)
    if relation is None:
        if map_shape is None:
            if example_shape is None:
                raise ConfigError("RelationNet needs map_shape=(C, H, W) (the encoder's feature maps) or "
                                  "example_shape=(C, H, W) to measure them")
            was = encoder.training
            encoder.eval()
            with torch.no_grad():
                map_shape = tuple(encoder(torch.zeros(2, *example_shape)).shape[1:])
            encoder.train(was)
        if len(map_shape) != 3:
            raise ConfigError(f"RelationNet: the encoder must return feature maps [B, C, H, W], not [B, "
                              f"{', '.join(map(str, map_shape))}]")
        relation = RelationModule(map_shape[0], map_shape[1], o.hidden)
    return _built(RelationNetwork(encoder, relation, example_dims=3), "relation", o)


def FineTune(encoder: nn.Module, num_classes: int, *, features: int | None = None, example_shape=None,
             example_dims: int | None = None, **options):
    """The fine-tuning baseline: ``encoder`` and a classifier over ``num_classes`` training classes
    are pre-trained (the episodes need global class ids, as :class:`EpisodeSampler` gives); a new
    head is fitted per task. Options ``head``, ``scale``, ``steps``, ``lr``, ``finetune_backbone``,
    ``backbone_lr``."""
    from metamap.algorithms.finetune import FineTuneBaseline
    o = learner_options("finetune", options)
    dims = infer_example_dims(encoder, example_shape, example_dims)
    learner = FineTuneBaseline(encoder, dims, infer_features(encoder, example_shape, features), num_classes,
                               o.head, o.scale, o.steps, o.lr, o.finetune_backbone, o.backbone_lr)
    return _built(learner, "finetune", o)


def MANN(encoder: nn.Module, *, classes: int, features: int | None = None, example_shape=None,
         example_dims: int | None = None, seed: int = 0, **options):
    """A memory-augmented network reading ``encoder``'s features; ``classes``: the most ways it
    will see. Options ``hidden``, ``slots``, ``width``, ``heads``, ``gamma``, ``strength``, ``add_vector``."""
    from metamap.algorithms.mann import MemoryAugmentedNetwork
    o = learner_options("mann", {**options, "classes": classes})
    dims = infer_example_dims(encoder, example_shape, example_dims)
    learner = MemoryAugmentedNetwork(encoder, dims, infer_features(encoder, example_shape, features), o.classes,
                                     o.hidden, o.slots, o.width, o.heads, o.gamma, seed=seed,
                                     strength=o.strength, add_vector=o.add_vector)
    return _built(learner, "mann", o)


# -- meta-reinforcement learning ------------------------------------------------------------------
def rl_family(env="navigation2d", *, oracle: bool = False, horizon: int | None = None):
    """A task family: ``env`` itself if it is one, else the family of that name
    (``navigation2d``, ``cheetah-velocity``, ``cheetah-direction``), as ``[data]`` makes it."""
    from metamap.rl.envs import TaskFamily, make_family
    if isinstance(env, TaskFamily):
        if oracle and not env.oracle:
            raise ConfigError("the oracle sees the task's parameters: give env as a name, or a family made "
                              "with oracle=True")
        return env
    return make_family(env, oracle=oracle, horizon=horizon)


def gaussian_policy(policy: nn.Module | None, family):
    """``policy`` as a Gaussian policy for ``family``: ``None`` (the learner builds its MLP), one of
    metamap's policies as is, or any network ``[..., observation] -> [..., action]`` as the mean."""
    from metamap.rl.policies import GaussianMLPPolicy, GaussianPolicy
    if policy is None:
        return None
    if not isinstance(policy, (GaussianMLPPolicy, GaussianPolicy)):
        policy = GaussianPolicy(policy, family.policy_obs_dim, family.act_dim)
    try:
        with torch.no_grad():
            mean, _ = policy.distribution(policy.params(), torch.zeros(1, 1, family.policy_obs_dim))
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise ConfigError(f"the policy does not take {family.name}'s observations [..., {family.policy_obs_dim}]: "
                          f"{type(e).__name__}: {e}") from None
    if tuple(mean.shape) != (1, 1, family.act_dim):
        raise ConfigError(f"the policy maps [1, 1, {family.policy_obs_dim}] observations to {list(mean.shape)}; "
                          f"{family.name} needs actions [..., {family.act_dim}]")
    return policy


def _seeded(seed: int, build):
    # The learner's own policy starts from `seed`, without touching the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _policy_gradient(name: str, policy, env, horizon, seed: int, options):
    from metamap.rl.learners import pg_learner
    o = learner_options(name, options)
    family = rl_family(env, oracle=name == "oracle", horizon=horizon)
    policy = gaussian_policy(policy, family)
    return _built(_seeded(seed, lambda: pg_learner(family, o, policy)), name, o)


def MAMLTRPO(policy: nn.Module | None = None, *, env="navigation2d", horizon: int | None = None,
             seed: int = 0, **options):
    """MAML for RL (policy-gradient inner step, TRPO outer step) on the tasks of ``env`` (a family
    name or a :class:`~metamap.rl.envs.TaskFamily`). ``policy``: the mean network of a Gaussian
    policy (observations ``[..., obs]`` -> actions ``[..., act]``; any ``nn.Module``), or ``None``
    for the ``hidden``/``activation`` MLP. Options: those of ``[learner]`` for ``name =
    "maml-trpo"`` (inner_steps, inner_lr, trajectories, max_kl, eval_trajectories, ...).
    Train it with ``fit(learner, learner.env_family, ...)``."""
    return _policy_gradient("maml-trpo", policy, env, horizon, seed, options)


def FOMAMLTRPO(policy: nn.Module | None = None, *, env="navigation2d", horizon: int | None = None,
               seed: int = 0, **options):
    """First-order MAML for RL (``first_order = true``); see :func:`MAMLTRPO`."""
    return _policy_gradient("fomaml-trpo", policy, env, horizon, seed, options)


def MAMLProMP(policy: nn.Module | None = None, *, env="navigation2d", horizon: int | None = None,
              seed: int = 0, **options):
    """MAML for RL with a ProMP-style outer step (Adam on the clipped surrogate, the
    low-variance-curvature inner estimator); see :func:`MAMLTRPO`."""
    return _policy_gradient("maml-promp", policy, env, horizon, seed, options)


def Pretrained(policy: nn.Module | None = None, *, env="navigation2d", horizon: int | None = None,
               seed: int = 0, **options):
    """Baseline: one policy trained by TRPO on all tasks jointly, fine-tuned by policy gradient at
    test time; see :func:`MAMLTRPO`."""
    return _policy_gradient("pretrained", policy, env, horizon, seed, options)


def RandomInit(policy: nn.Module | None = None, *, env="navigation2d", horizon: int | None = None,
               seed: int = 0, **options):
    """Baseline: the initial policy, untrained, fine-tuned by policy gradient at test time (``fit``
    takes 0 steps by default); see :func:`MAMLTRPO`."""
    return _policy_gradient("random", policy, env, horizon, seed, options)


def Oracle(policy: nn.Module | None = None, *, env="navigation2d", horizon: int | None = None,
           seed: int = 0, **options):
    """Baseline: TRPO on all tasks with each task's parameters in the observation (the policy sees
    ``obs + task`` values); see :func:`MAMLTRPO`."""
    return _policy_gradient("oracle", policy, env, horizon, seed, options)


def RL2(policy: nn.Module | None = None, *, env="navigation2d", horizon: int | None = None,
        seed: int = 0, **options):
    """RL²: a GRU policy that remembers a task's earlier episodes, trained by PPO. ``policy``: a
    :class:`~metamap.rl.policies.RecurrentPolicy` for ``env``'s observations and actions, or
    ``None`` for one of ``hidden`` units. Options: those of ``[learner]`` for ``name = "rl2"``
    (episodes, trajectories, ppo_epochs, minibatches, eval_trajectories, ...)."""
    from metamap.rl.learners import rl2_learner
    from metamap.rl.policies import RecurrentPolicy
    o = learner_options("rl2", options)
    family = rl_family(env, horizon=horizon)
    if policy is not None and not (isinstance(policy, RecurrentPolicy) and policy.obs_dim == family.policy_obs_dim
                                   and policy.act_dim == family.act_dim):
        raise ConfigError(f"RL2 needs a RecurrentPolicy({family.policy_obs_dim}, {family.act_dim}, hidden) for "
                          f"{family.name}, or policy=None")
    return _built(_seeded(seed, lambda: rl2_learner(family, o, policy)), "rl2", o)


# -- data ----------------------------------------------------------------------------------------
def as_dataset(data, what: str = "data"):
    """A :class:`ClassDataset`, or ``(x, y)`` tensors (examples ``[n, *example]``, labels ``[n]``)."""
    from metamap.data.dataset import ClassDataset
    if isinstance(data, ClassDataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = (torch.as_tensor(v) for v in data)
        if y.dim() != 1 or torch.is_floating_point(y) or x.shape[0] != y.shape[0]:
            raise ConfigError(f"{what}: give (x, y) with examples x [n, ...] and integer class labels y [n], not "
                              f"x {list(x.shape)} and y {list(y.shape)} {y.dtype}")
        classes, labels = torch.unique(y, return_inverse=True)
        return ClassDataset(x, labels, [str(int(c)) for c in classes], description=f"{what}: {len(classes)} classes")
    raise ConfigError(f"{what}: expected a ClassDataset or a tuple (x, y) of tensors, not {type(data).__name__}")


def as_sampler(data, what: str, ways: int, shots: int, queries: int, tasks_per_batch: int, seed: int,
               split: str = "train"):
    """A task sampler for ``data``: one given as is (anything with ``batch`` and ``episodes``), the
    ``split`` tasks of a meta-RL task family, or N-way K-shot Q-query episodes over a data set."""
    if hasattr(data, "batch") and hasattr(data, "episodes"):
        return data
    from metamap.rl.envs import TaskFamily
    if isinstance(data, TaskFamily):
        from metamap.rl.tasks import RLTaskSampler
        return RLTaskSampler(data, tasks_per_batch, seed, split)
    from metamap.tasks.sampler import EpisodeSampler
    return EpisodeSampler(as_dataset(data, what), ways, shots, queries, tasks_per_batch, seed)


# -- fit and evaluate ----------------------------------------------------------------------------
@dataclass
class FitResult:
    """What :func:`fit` did: steps taken, the best validation (``{"step", "metric", "mean"}``),
    whether a callback stopped it early, and the run folder (``None`` if it was temporary)."""

    steps: int
    best: dict | None
    stopped: str | None
    run_dir: Path | None
    config: dict


FLAT_SECTIONS = ("episode", "optim", "schedule", "train")


def training_config(learner: str | None = None, seed: int = 0, **options) -> dict:
    """The complete ``[episode]``, ``[optim]``, ``[schedule]``, ``[train]`` and ``[eval]`` sections
    from keywords: a key that only one of the first four sections has (``steps``, ``lr``, ``ways``,
    ``warmup``...), or a whole section as a dict (``optim={"name": "sgd", "momentum": 0.9}``).
    Keys not given take the defaults of ``metamap train`` for the registered learner ``learner``
    (its recipe's sections, e.g. Reptile's outer SGD), else the global defaults."""
    from metamap.config import SECTIONS, RootOptions
    from metamap.options import field_names
    owners: dict[str, list[str]] = {}
    for s in FLAT_SECTIONS:
        for k in field_names(SECTIONS[s]):
            owners.setdefault(k, []).append(s)
    user: dict[str, dict] = {s: {} for s in SECTIONS}
    for key, value in options.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{key}= must be a dict of [{key}] keys, not {value!r}")
            user[key].update(value)
        elif len(owners.get(key, [])) == 1:
            user[owners[key][0]][key] = value
        elif key in owners:
            raise ConfigError(f"{key!r} is a key of {' and '.join(owners[key])}; pass it in a section, e.g. "
                              f"{owners[key][0]}={{'{key}': {value!r}}}")
        else:
            known = sorted(k for k, v in owners.items() if len(v) == 1)
            raise ConfigError(f"unknown option {key!r}; give one of {', '.join(known)}, or a section "
                              f"({', '.join(SECTIONS)}) as a dict")
    recipe = plugin("learner", learner).defaults if learner is not None else {}
    out = RootOptions(seed=seed).to_dict()
    for s, cls in SECTIONS.items():
        out[s] = cls.from_section({**recipe.get(s, {}), **user[s]}).to_dict()
    return out


def fit(learner, data, *, val_data=None, callbacks=(), run_dir=None, seed: int = 0, progress: bool = True,
        restore_best: bool = True, **options) -> FitResult:
    """Meta-train ``learner`` on ``data`` through the trainer of ``metamap train``.

    ``data``: a :class:`ClassDataset`, ``(x, y)`` tensors, or a task sampler; episodes are drawn as
    ``ways``/``shots``/``queries``/``tasks_per_batch`` say. ``val_data`` (same kinds): fixed
    validation episodes of the same ways, shots and queries every ``val_every`` steps
    (``val_episodes`` of them, seed ``val_seed``),
    the best of which is kept (and loaded back into ``learner`` at the end, with ``restore_best``).
    Other keywords are config keys (see :func:`training_config`): ``steps=500``, ``lr=1e-3``,
    ``optim={"name": "sgd"}``... ``callbacks``: objects with any of ``on_step``,
    ``on_validation``, ``on_fit_end`` (see :mod:`metamap.train.callbacks`). ``run_dir``: where
    checkpoints and ``metrics.jsonl`` go (default: a temporary folder, removed at the end).
    """
    from metamap.train import checkpoint
    from metamap.train.evaluate import evaluate as run_evaluation
    from metamap.train.precision import resolve_precision
    from metamap.train.runtime import pick_device, set_threads
    from metamap.train.trainer import Trainer

    name = getattr(learner, "name", None)
    if not isinstance(name, str):
        name = learner.name = type(learner).__name__
    registered = name if name in plugins("learner") else None
    config = training_config(registered, seed=seed, **options)
    ep, t = config["episode"], config["train"]
    sampler = as_sampler(data, "data", ep["ways"], ep["shots"], ep["queries"], ep["tasks_per_batch"], seed)
    device = pick_device(t["device"])
    if t["threads"]:
        set_threads(t["threads"])
    learner.to(device)
    precision = resolve_precision(t["precision"], device, learner)[0]
    validate = None
    if val_data is not None and t["val_every"]:
        val = as_sampler(val_data, "val_data", ep["ways"], ep["shots"], ep["queries"], 1, t["val_seed"], "val")
        validate = lambda: run_evaluation(learner, val, t["val_episodes"], device=device, progress=False,
                                          setting=f"val {val.describe()}", precision=precision,
                                          cache_mb=config["eval"]["cache_mb"])
    temporary = run_dir is None
    folder = Path(tempfile.mkdtemp(prefix="metamap-fit-")) if temporary else Path(run_dir)
    meta = {"learner": learner.name, "config": {**config, "learner": python_learner_section(learner)},
            "data_info": None, "python": True}
    trainer = Trainer(learner, sampler, config, folder, meta, validate=validate, device=device,
                      progress=progress, callbacks=list(callbacks))
    try:
        best = trainer.fit()
        if restore_best and validate is not None and (folder / "best").exists():
            path, best_meta = checkpoint.read_meta(folder / "best")
            checkpoint.load_state(learner, checkpoint.read_tensors(path, checkpoint.WEIGHTS, best_meta), path)
    finally:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)
    return FitResult(trainer.step, best, trainer.stop_reason, None if temporary else folder, config)


def python_learner_section(learner) -> dict:
    """The ``[learner]`` section that describes a learner built in Python (name and options)."""
    options = getattr(learner, "options", None)
    return {"name": learner.name, **(options.to_dict() if options is not None else {})}


def evaluate(learner, data, *, ways: int = 5, shots: int = 1, queries: int | None = None,
             episodes: int | None = None, seed: int | None = None, device="cpu", precision: str = "fp32",
             progress: bool = False, **eval_options):
    """Mean score ± 95 % CI of ``learner`` on fixed ``ways``-way ``shots``-shot episodes of ``data``
    (a :class:`ClassDataset`, ``(x, y)`` tensors or a task sampler), through the evaluator of
    ``metamap eval``. Defaults as ``[eval]``: 15 queries per class, 1000 episodes, seed 2024;
    other ``[eval]`` keys as keywords (``tasks_per_batch``, ``finetune``, ``finetune_lr``...)."""
    from metamap.config import EvalOptions, TrainOptions
    from metamap.train.run import test

    given = {"queries": queries, "episodes": episodes, "seed": seed}
    e = EvalOptions.from_section({**{k: v for k, v in given.items() if v is not None}, **eval_options,
                                  "ways": [ways], "shots": [shots]})
    config = {"eval": e.to_dict(), "train": TrainOptions.from_section({"precision": precision}).to_dict()}
    sampler = as_sampler(data, "data", ways, shots, e.queries, 1, e.seed, "test")
    learner.to(device)
    return test(learner, config, [sampler], torch.device(device), progress=progress)[0]


def adapted(learner, support_x: Tensor, support_y: Tensor, ways: int | None = None):
    """``learner.adapt`` with gradients on exactly when the learner adapts by gradient steps."""
    with torch.set_grad_enabled(learner.adapts_with_gradients):
        return learner.adapt(support_x, support_y, ways)
