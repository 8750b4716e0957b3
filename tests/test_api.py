"""The Python API: learners around any nn.Module with the config's options, fit/evaluate through
the CLI's trainer and evaluator, callbacks, and metamap.load's object."""
import json

import pytest
import torch
from torch import nn

import metamap
from metamap import config as configlib
from metamap.errors import CheckpointError, ConfigError
from metamap.registry import DataInfo, build_learner, data_source
from metamap.tasks.sampler import EpisodeSampler
from metamap.train.callbacks import EarlyStopping, JsonLinesLogger, LearningRateMonitor
from metamap.train.evaluate import EvalResult
from metamap.train.evaluate import evaluate as run_evaluation


def tensors(classes=12, per_class=6, shape=(1, 12, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(classes, *shape, generator=g)
    y = torch.arange(classes).repeat_interleave(per_class)
    return patterns[y] + 0.3 * torch.randn(len(y), *shape, generator=g), y


def cnn(out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, out))


def task(ways=3, shots=2, queries=2, seed=1):
    x, y = tensors(classes=ways, per_class=shots + queries, seed=seed)
    s = torch.cat([torch.arange(c * (shots + queries), c * (shots + queries) + shots) for c in range(ways)])
    q = torch.tensor([i for i in range(len(y)) if i not in set(s.tolist())])
    return x[s], y[s], x[q], y[q]


GRADIENT = {"MAML": "maml", "FOMAML": "fomaml", "MetaSGD": "metasgd", "Reptile": "reptile"}


@pytest.mark.parametrize("ctor", list(GRADIENT))
def test_gradient_learners_wrap_any_module_with_the_configs_options(ctor):
    learner = getattr(metamap, ctor)(cnn(3), ways=3)
    defaults = configlib.resolve(overrides=[f"learner.name={GRADIENT[ctor]!r}"])["learner"]
    assert {"name": learner.name, **learner.options.to_dict()} == defaults     # one source of defaults
    sx, sy, qx, _ = task()
    with torch.enable_grad():
        assert learner.eval().adapt(sx, sy)(qx).shape == (len(qx), 3)
    tuned = getattr(metamap, ctor)(cnn(3), ways=3, inner_steps=2, inner_lr=0.05)
    assert (tuned.inner_steps, tuned.options.inner_lr) == (2, 0.05)


def test_option_errors_are_the_configs():
    with pytest.raises(ConfigError, match="learner.inner_lr must be a number > 0 and <= 1e\\+06"):
        metamap.MAML(cnn(3), inner_lr=0)
    with pytest.raises(ConfigError, match="learner.inner_lr must be a number > 0 and <= 1e\\+06"):
        configlib.resolve(overrides=["learner.name=maml", "learner.inner_lr=0"])
    with pytest.raises(ConfigError, match="unknown config key 'learner.inner_rate'"):
        metamap.MAML(cnn(3), inner_rate=0.1)
    with pytest.raises(ConfigError, match="learner.loss must be contrastive or bce"):
        metamap.Siamese(nn.Flatten(), loss="hinge")
    with pytest.raises(ConfigError, match="example_dims"):
        metamap.ProtoNet(nn.Identity())


@pytest.mark.integration
def test_frozen_weights_neither_adapt_nor_learn():
    net = cnn(3)
    net[0].requires_grad_(False)
    learner = metamap.MAML(net, ways=3)
    assert not any(n.startswith("body.0.") for n in learner.split.adapted + learner.split.meta)
    before = {n: p.detach().clone() for n, p in learner.named_parameters()}
    x, y = tensors()
    metamap.fit(learner, (x, y), ways=3, shots=2, queries=2, tasks_per_batch=2, steps=2, val_every=0,
                progress=False)
    after = dict(learner.named_parameters())
    assert torch.equal(after["model.body.0.weight"], before["model.body.0.weight"])
    assert not torch.equal(after["model.body.4.weight"], before["model.body.4.weight"])


def test_every_other_learner_wraps_user_modules():
    shape = (1, 12, 12)
    sx, sy, qx, _ = task()
    encoder = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten())
    maps = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
    built = {
        "protonet": metamap.ProtoNet(encoder),
        "matching": metamap.MatchingNet(encoder, fce=True, fce_steps=2, example_shape=shape),
        "siamese": metamap.Siamese(encoder, loss="bce", example_shape=shape),
        "relation": metamap.RelationNet(maps, example_shape=shape, hidden=4),
        "finetune": metamap.FineTune(encoder, num_classes=12, example_shape=shape, steps=3),
        "mann": metamap.MANN(encoder, classes=5, example_shape=shape, hidden=8, slots=8, width=4, heads=2),
        "anil": metamap.ANIL(encoder, nn.Linear(4 * 144, 3), ways=3),
    }
    for name, learner in built.items():
        assert learner.name == name
        with torch.set_grad_enabled(learner.adapts_with_gradients):
            out = learner.eval().adapt(sx, sy)(qx)
        assert out.shape == (len(qx), 3), name
    assert built["matching"].fce.steps == 2 and built["mann"].heads == 2
    assert built["anil"].split.adapted == ("head.weight", "head.bias")


@pytest.mark.integration
def test_fit_trains_exactly_as_metamap_train(image_folder, tmp_path):
    import shutil

    from metamap.cli import main
    # A copy: the split file this run writes beside the images must not reach other tests' runs.
    image_folder = shutil.copytree(image_folder, tmp_path / "images", ignore=shutil.ignore_patterns("metamap-split.json"))
    sets = ["data.name='folder'", f"data.path='{image_folder}'", "data.image_size=16", "model.hidden=8",
            "episode.ways=3", "episode.shots=1", "episode.queries=2", "episode.tasks_per_batch=2",
            "train.steps=4", "train.val_every=0", "train.channels_last=false", "train.precision='fp32'",
            "train.threads=1", "schedule.step_size=2", "seed=3"]
    argv = ["train", "--run-dir", str(tmp_path / "cli"), "--no-test", "-q"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    config = configlib.resolve(overrides=sets)
    source = data_source(config)
    torch.manual_seed(3)
    learner = build_learner(config, source.info(config))
    result = metamap.fit(learner, source.dataset(config, "train"), run_dir=tmp_path / "py", seed=3, ways=3,
                         shots=1, queries=2, tasks_per_batch=2, steps=4, val_every=0, precision="fp32",
                         schedule={"step_size": 2}, progress=False)
    assert result.steps == 4 and result.run_dir == tmp_path / "py"
    cli = metamap.load(tmp_path / "cli" / "last").learner.state_dict()
    for k, v in learner.state_dict().items():
        assert torch.equal(v, cli[k]), k
    # ... and evaluates exactly as `metamap eval`.
    assert main(["eval", "--checkpoint", str(tmp_path / "cli"), "--json", str(tmp_path / "e.json"), "-q",
                 "--episodes", "12", "--set", "eval.ways=[2]", "--set", "eval.queries=2",
                 "--set", "train.precision='fp32'"]) == 0
    cli_eval = json.loads((tmp_path / "e.json").read_text())[0]
    mine = metamap.evaluate(learner, source.dataset(config, "test"), ways=2, shots=1, queries=2, episodes=12)
    assert mine.mean == cli_eval["mean"] and mine.ci95 == cli_eval["ci95"]


def test_evaluate_is_the_evaluator_on_fixed_episodes():
    x, y = tensors()
    learner = metamap.ProtoNet(nn.Flatten(), example_dims=3)
    result = metamap.evaluate(learner, (x, y), ways=3, shots=1, queries=2, episodes=9, seed=5)
    dataset = metamap.api.as_dataset((x, y))
    direct = run_evaluation(learner, EpisodeSampler(dataset, 3, 1, 2, 1, 5), 9, progress=False)
    assert (result.mean, result.ci95, result.episodes, result.seed) == (direct.mean, direct.ci95, 9, 5)
    with pytest.raises(ConfigError, match="eval.episodes must be a whole number >= 1"):
        metamap.evaluate(learner, (x, y), episodes=0)
    with pytest.raises(ConfigError, match="integer class labels"):
        metamap.evaluate(learner, (x, y.float()))


def test_fit_keywords_are_config_keys():
    config = metamap.api.training_config(steps=7, lr=0.01, warmup=2, ways=4, optim={"name": "sgd", "momentum": 0.9})
    assert (config["train"]["steps"], config["optim"]["lr"], config["schedule"]["warmup"]) == (7, 0.01, 2)
    assert config["episode"]["ways"] == 4 and config["optim"]["momentum"] == 0.9
    with pytest.raises(ConfigError, match="'name' is a key of optim and schedule"):
        metamap.api.training_config(name="sgd")
    with pytest.raises(ConfigError, match="unknown option 'step'"):
        metamap.api.training_config(step=3)
    with pytest.raises(ConfigError, match="schedule.warmup must be a whole number >= 0"):
        metamap.api.training_config(warmup=-1)


class FakeTrainer:
    def __init__(self):
        self.step, self.stopped = 0, None

    def request_stop(self, reason):
        self.stopped = reason


def result(mean, metric="accuracy", higher=True):
    return EvalResult(metric, mean, 0.0, 0.0, 10, "val", 0, higher_is_better=higher)


@pytest.mark.parametrize("metric, higher, means, stop_at", [
    ("accuracy", True, [0.5, 0.6, 0.6, 0.59, 0.7], 4),     # two validations without a gain: stop at the 4th
    ("mse", False, [2.0, 1.0, 1.5, 0.5, 0.6, 0.7], 6),     # lower is better
])
def test_early_stopping_follows_the_metrics_direction(metric, higher, means, stop_at):
    stop, trainer = EarlyStopping(patience=2), FakeTrainer()
    for i, m in enumerate(means, start=1):
        trainer.step = i
        stop.on_validation(trainer, result(m, metric, higher), False)
        if trainer.stopped:
            break
    assert stop.stopped_at == stop_at and "has not improved" in trainer.stopped


def test_early_stopping_min_delta_and_checks():
    stop, trainer = EarlyStopping(patience=1, min_delta=0.05), FakeTrainer()
    stop.on_validation(trainer, result(0.5), False)
    stop.on_validation(trainer, result(0.54), False)          # +0.04 is not more than min_delta
    assert trainer.stopped and stop.best == 0.5
    for bad in ({"patience": 0}, {"min_delta": -1}, {"mode": "up"}):
        with pytest.raises(ConfigError):
            EarlyStopping(**bad)


class Recorder(metamap.Callback):
    def __init__(self, stop_at=None):
        self.steps, self.validations, self.ends, self.stop_at = [], [], 0, stop_at

    def on_step(self, trainer, record):
        self.steps.append((trainer.step, record["step"], trainer.optimizer.param_groups[0]["lr"]))
        if trainer.step == self.stop_at:
            trainer.request_stop("asked")

    def on_validation(self, trainer, result, is_best):
        self.validations.append((trainer.step, result.metric, is_best, trainer.best["step"] if is_best else None))

    def on_fit_end(self, trainer):
        self.ends += 1


@pytest.mark.integration
def test_callbacks_see_the_trainers_state_and_can_stop_it(tmp_path):
    from metamap.train.checkpoint import read_meta
    x, y = tensors()
    rec, lrs = Recorder(stop_at=5), LearningRateMonitor()
    learner = metamap.ProtoNet(nn.Sequential(nn.Flatten(), nn.Linear(144, 8)))
    result = metamap.fit(learner, (x, y), val_data=tensors(seed=1), ways=3, shots=1, queries=2, steps=20,
                         val_every=2, val_episodes=4, schedule={"warmup": 4, "step_size": 4}, checkpoint_every=100, run_dir=tmp_path / "r",
                         callbacks=[rec, lrs, JsonLinesLogger(tmp_path / "log.jsonl")], progress=False)
    assert result.steps == 5 and result.stopped == "asked" and rec.ends == 1
    assert [s for s, _, _ in rec.steps] == [1, 2, 3, 4, 5] == [r for _, r, _ in rec.steps]
    assert [lr for _, _, lr in rec.steps] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 5e-4])   # warm-up, step decay
    assert lrs.history == [(s, [lr]) for s, _, lr in rec.steps]
    assert [v[0] for v in rec.validations] == [2, 4] and rec.validations[0][1:3] == ("accuracy", True)
    assert read_meta(tmp_path / "r" / "last")[1]["step"] == 5                 # written where it stopped
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 2, 3, 4, 4, 5] and "val_accuracy" in lines[2]


@pytest.mark.integration
def test_tensorboard_logger_writes_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    x, y = tensors()
    learner = metamap.ProtoNet(nn.Sequential(nn.Flatten(), nn.Linear(144, 8)))
    metamap.fit(learner, (x, y), val_data=tensors(seed=1), ways=3, shots=1, queries=2, steps=4, val_every=2,
                val_episodes=4, log_every=1, callbacks=[metamap.TensorBoardLogger(tmp_path / "tb")], progress=False)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("val/accuracy")] == [2, 4]


def test_tensorboard_logger_without_the_package_says_how_to_get_it(monkeypatch, tmp_path):
    import sys
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)        # as if not installed
    with pytest.raises(ConfigError, match="needs the tensorboard package: pip install tensorboard"):
        metamap.TensorBoardLogger(tmp_path / "tb")


@pytest.mark.integration
def test_load_returns_an_object_and_learners_built_in_python_need_their_modules(tmp_path):
    x, y = tensors()
    torch.manual_seed(0)
    learner = metamap.MAML(cnn(3), ways=3, inner_steps_eval=2)
    metamap.fit(learner, (x, y), ways=3, shots=1, queries=2, tasks_per_batch=2, steps=2, val_every=0,
                run_dir=tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError, match=r"built in Python.*metamap.load\(path, learner="):
        metamap.load(tmp_path / "run")
    loaded = metamap.load(tmp_path / "run", learner=metamap.MAML(cnn(3), ways=3, inner_steps_eval=2))
    assert loaded.meta["step"] == 2 and loaded.config["learner"]["inner_steps_eval"] == 2
    assert loaded.spec is None and loaded.info is None and not loaded.learner.training
    for k, v in learner.state_dict().items():
        assert torch.equal(loaded.learner.state_dict()[k], v)
    sx, sy, qx, _ = task()
    learner.eval()
    with torch.enable_grad():
        expected = learner.adapt(sx, sy)(qx)
    assert torch.equal(loaded.adapt(sx, sy)(qx), expected)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        metamap.load(tmp_path / "run", learner=metamap.MAML(cnn(5), ways=5))


def test_example_dims_and_features_are_inferred():
    from metamap.api import infer_example_dims, infer_features
    assert infer_example_dims(cnn(3)) == 3 and infer_example_dims(nn.Linear(4, 2)) == 1
    assert infer_example_dims(nn.Identity(), example_shape=(5,)) == 1
    assert infer_features(nn.Linear(4, 7)) == 7
    assert infer_features(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), example_shape=(1, 5, 5)) == 18
    with pytest.raises(ConfigError, match="features=N"):
        infer_features(nn.Flatten())


# -- meta-reinforcement learning ------------------------------------------------------------------
RL = {"MAMLTRPO": "maml-trpo", "FOMAMLTRPO": "fomaml-trpo", "MAMLProMP": "maml-promp", "Pretrained": "pretrained",
      "RandomInit": "random", "Oracle": "oracle", "RL2": "rl2"}


@pytest.mark.parametrize("ctor", list(RL))
def test_rl_learners_take_the_configs_options_and_build_what_metamap_train_builds(ctor):
    name = RL[ctor]
    learner = getattr(metamap, ctor)(env="navigation2d", seed=3)
    cfg = configlib.resolve(overrides=[f"learner.name={name!r}", "data.name='navigation2d'", "seed=3"])
    assert {"name": learner.name, **learner.options.to_dict()} == cfg["learner"]     # one source of defaults
    torch.manual_seed(cfg["seed"])                   # as metamap train seeds the learner it builds
    built = build_learner(cfg, data_source(cfg).info(cfg))
    assert learner.state_dict().keys() == built.state_dict().keys()
    for k, v in built.state_dict().items():
        assert torch.equal(learner.state_dict()[k], v), k
    assert learner.env_family.oracle == (name == "oracle") and learner.obs_dim == (4 if name == "oracle" else 2)


def test_rl_options_are_checked_and_seeds_leave_the_callers_random_state_alone():
    with pytest.raises(ConfigError, match="learner.inner_lr must be a number > 0"):
        metamap.MAMLTRPO(inner_lr=0)
    with pytest.raises(ConfigError, match="unknown config key 'learner.inner_rate'"):
        metamap.MAMLTRPO(inner_rate=0.1)
    with pytest.raises(ConfigError, match="learner.ppo_epochs must be a whole number from 1"):
        metamap.RL2(ppo_epochs=0)
    with pytest.raises(ConfigError, match="unknown RL task family 'maze'"):
        metamap.MAMLTRPO(env="maze")
    assert metamap.FOMAMLTRPO().cfg.first_order and metamap.Pretrained().cfg.inner_steps == 0
    assert (metamap.MAMLProMP().cfg.outer, metamap.MAMLProMP().cfg.estimator) == ("ppo", "lvc")
    torch.manual_seed(11)
    before = torch.random.get_rng_state()
    a, b, c = metamap.MAMLTRPO(seed=1), metamap.MAMLTRPO(seed=1), metamap.MAMLTRPO(seed=2)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a.policy.layers[0].weight, b.policy.layers[0].weight)
    assert not torch.equal(a.policy.layers[0].weight, c.policy.layers[0].weight)


def test_rl_learners_wrap_a_users_policy_network():
    from metamap.rl.policies import GaussianPolicy, RecurrentPolicy
    mean = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))
    learner = metamap.MAMLTRPO(mean, horizon=5)
    assert isinstance(learner.policy, GaussianPolicy) and learner.policy.mean is mean
    assert sorted(n for n, _ in learner.named_parameters()) == [
        "policy.log_std", "policy.mean.0.bias", "policy.mean.0.weight", "policy.mean.2.bias", "policy.mean.2.weight"]
    with pytest.raises(ConfigError, match=r"maps \[1, 1, 2\] observations to \[1, 1, 3\]; navigation2d needs "
                                          r"actions \[..., 2\]"):
        metamap.MAMLTRPO(nn.Linear(2, 3))
    with pytest.raises(ConfigError, match=r"does not take navigation2d's observations \[..., 4\]"):
        metamap.Oracle(nn.Linear(2, 2))                   # the oracle also sees the goal: 4 inputs
    mine = RecurrentPolicy(2, 2, hidden=5)
    assert metamap.RL2(mine).policy is mine
    with pytest.raises(ConfigError, match=r"RL2 needs a RecurrentPolicy\(2, 2, hidden\)"):
        metamap.RL2(mean)


@pytest.mark.integration
def test_a_users_policy_computes_what_the_built_in_mlp_does():
    """The same weights as metamap's Gaussian MLP, given as a plain nn.Sequential (run per task by
    functional_call instead of batched matrix products): the same episodes, and in float64 the
    same meta-objective, meta-gradient through the inner step and KL curvature (what TRPO uses);
    a whole fit step then lands on nearly the same weights (conjugate gradient on a nearly
    singular curvature magnifies the last bits of rounding)."""
    from metamap.rl.tasks import RLTaskSampler
    from metamap.rl.trpo import flat, kl_hvp
    torch.set_default_dtype(torch.float64)
    try:
        options = dict(horizon=6, hidden=[5], activation="tanh", trajectories=3, eval_trajectories=3)
        builtin = metamap.MAMLTRPO(seed=4, **options)
        mean = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 2))
        with torch.no_grad():
            for mine, theirs in zip((mean[0], mean[2]), builtin.policy.layers):
                mine.weight.copy_(theirs.weight)
                mine.bias.copy_(theirs.bias)
        wrapped = metamap.MAMLTRPO(mean, **options)
        tasks = RLTaskSampler(builtin.env_family, 2, 0, "train").batch(0)
        computed = []
        for learner in (builtin, wrapped):
            batch = learner.meta.collect(tasks.tasks(), tasks.seeds)
            loss, kl = learner.meta.objectives(batch)
            params = [p for _, p in learner.policy.named_parameters()]
            value = loss(params)
            curvature = kl_hvp(kl, params, 1e-5)(torch.linspace(-1, 1, sum(p.numel() for p in params)))
            computed.append((batch.query.obs, value, flat(torch.autograd.grad(value, params)), curvature))
        for a, b in zip(*computed):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
        assert computed[0][2].abs().max() > 1e-3                  # a real gradient, not zeros
        before = builtin.policy.layers[0].weight.detach().clone()
        for learner in (builtin, wrapped):
            metamap.fit(learner, learner.env_family, steps=1, tasks_per_batch=2, progress=False)
        assert (builtin.policy.layers[0].weight - before).abs().max() > 1e-3
        torch.testing.assert_close(wrapped.policy.mean[0].weight, builtin.policy.layers[0].weight,
                                   rtol=1e-3, atol=1e-4)
        result = metamap.evaluate(wrapped, wrapped.env_family, episodes=3)
        assert result.metric == "return_1" and result.higher_is_better and result.episodes == 3
        assert set(result.others) == {"return_0", "return_2", "return_3"}
    finally:
        torch.set_default_dtype(torch.float32)


# -- any registered learner, a new one included ---------------------------------------------------
def test_build_gives_any_registered_learner_as_metamap_train_builds_it():
    learner = metamap.build("maml", example_shape=(1, 12, 12), ways=3, inner_steps=2,
                            model={"hidden": 4, "layers": 2}, seed=5)
    cfg = configlib.resolve(overrides=["learner.name='maml'", "learner.inner_steps=2", "model.hidden=4",
                                       "model.layers=2", "episode.ways=3", "seed=5"])
    torch.manual_seed(5)
    built = build_learner(cfg, DataInfo((1, 12, 12)))
    assert learner.name == "maml" and learner.options.inner_steps == 2
    assert {k: v.shape for k, v in learner.state_dict().items()} == {k: v.shape for k, v in built.state_dict().items()}
    for k, v in built.state_dict().items():
        assert torch.equal(learner.state_dict()[k], v), k
    with pytest.raises(ConfigError, match="learner.inner_steps must be a whole number"):
        metamap.build("maml", example_shape=(1, 12, 12), inner_steps=-1)
    with pytest.raises(ConfigError, match="unknown learner 'mamll'"):
        metamap.build("mamll", example_shape=(1, 12, 12))


@pytest.fixture
def nearest_mean():
    """A learner that exists only in this test: one registration, nothing else touched."""
    from dataclasses import dataclass

    from metamap.algorithms.base import MetaLearner
    from metamap.options import ARCHITECTURE, Options, option
    from metamap.registry import _PLUGINS, register_learner

    class NearestMean(MetaLearner):
        def __init__(self, example_dims, features, temperature):
            super().__init__(example_dims)
            self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(144, features))
            self.temperature = temperature

        def adapt_tasks(self, support_x, support_y, ways):
            z = self.encoder(support_x.flatten(0, 1)).unflatten(0, support_x.shape[:2])        # [T, S, D]
            one_hot = nn.functional.one_hot(support_y, ways).to(z.dtype)                       # [T, S, W]
            means = one_hot.transpose(1, 2) @ z / one_hot.sum(1).unsqueeze(-1)                  # [T, W, D]
            return lambda q: -torch.cdist(self.encoder(q.flatten(0, 1)).unflatten(0, q.shape[:2]),
                                          means) / self.temperature

    @dataclass(frozen=True, kw_only=True)
    class NearestMeanOptions(Options):
        section = "learner"
        features: int = option(16, low=1, high=4096, role=ARCHITECTURE)
        temperature: float = option(1.0, low=0, low_open=True, role=ARCHITECTURE)

    @register_learner("test-nearest-mean", options=NearestMeanOptions, family="metric", summary="test only")
    def _build(config, info):
        o = config["learner"]
        return NearestMean(len(info.example_shape), o["features"], o["temperature"])
    yield
    del _PLUGINS["learner"]["test-nearest-mean"]


@pytest.mark.integration
def test_a_learner_registered_in_one_place_is_built_trained_and_evaluated_from_python(nearest_mean):
    with pytest.raises(ConfigError, match="learner.temperature must be a positive number, not 0"):
        metamap.build("test-nearest-mean", example_shape=(1, 12, 12), temperature=0)
    learner = metamap.build("test-nearest-mean", example_shape=(1, 12, 12), features=8, seed=2)
    assert learner.encoder[1].out_features == 8 and learner.options.to_dict() == {"features": 8, "temperature": 1.0}
    x, y = tensors(classes=12, per_class=6)
    x = x + 1.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))     # hard enough to learn
    before = run_evaluation(learner, EpisodeSampler(metamap.api.as_dataset((x, y)), 3, 1, 2, 1, 7), 20,
                            progress=False)
    result = metamap.fit(learner, (x, y), ways=3, shots=1, queries=2, tasks_per_batch=4, steps=30, lr=3e-3,
                         progress=False)
    assert result.steps == 30 and result.config["optim"]["lr"] == 3e-3
    after = metamap.evaluate(learner, (x, y), ways=3, shots=1, queries=2, episodes=20, seed=7)
    assert after.setting == before.setting and after.mean > before.mean
