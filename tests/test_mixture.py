"""Multi-domain mixture: one domain per episode, seeded, in the configured proportions; leave-one-domain-out."""
import numpy as np
import pytest
import torch

from metamap import config as configlib
from metamap.errors import ConfigError, EpisodeError
from metamap.registry import data_source
from tests.test_idx import write_family


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return {name: write_family(root / name, classes=10, per_class=6, size=8, seed=i)
            for i, name in enumerate(("mnist", "kmnist", "fashionmnist"))}


def mixture(folders, *extra, holdout="", weights="[]"):
    domains = ", ".join(f'{{name = "{n}", path = "{p}", image_size = 8, fractions = [0.6, 0.2, 0.2]}}'
                        for n, p in folders.items())
    cfg = configlib.resolve(overrides=["data.name='mixture'", f"data.domains=[{domains}]", "data.image_size=8",
                                       f"data.holdout='{holdout}'", f"data.weights={weights}", *extra])
    return cfg, data_source(cfg)


def test_each_episode_from_one_domain_in_the_configured_proportions(folders):
    cfg, source = mixture(folders, weights="[3, 1, 0]")
    sampler = source.sampler(cfg, "train", 2, 1, 1, 4, seed=11)
    domains = np.array([sampler.domain_of(i, p) for i in range(2000) for p in range(4)])
    n = len(domains)
    share = np.bincount(domains, minlength=3) / n
    assert share[2] == 0
    assert abs(share[0] - 0.75) < 4 * np.sqrt(0.75 * 0.25 / n)          # within 4 standard errors
    batch = sampler.batch(3)
    names = source.dataset(cfg, "train").class_names
    for row in batch.classes.tolist():                                    # every task is pure: one domain
        assert len({names[c].split(":")[0] for c in row}) == 1


def test_episodes_are_pure_functions_of_seed_and_index(folders):
    cfg, source = mixture(folders)
    a = source.sampler(cfg, "train", 2, 1, 1, 4, seed=5)
    b = data_source(cfg).sampler(cfg, "train", 2, 1, 1, 4, seed=5)
    assert torch.equal(a.batch(7).support_x, b.batch(7).support_x)
    assert torch.equal(a.batch(7, rank=1, world_size=2).classes, b.batch(7).classes[2:])
    c = source.sampler(cfg, "train", 2, 1, 1, 4, seed=6)
    assert not torch.equal(a.batch(7).classes, c.batch(7).classes)


def test_leave_one_domain_out(folders):
    cfg, source = mixture(folders, holdout="kmnist")
    domains = {s: {n.split(":")[0] for n in source.dataset(cfg, s).class_names} for s in ("train", "val", "test", "tune")}
    assert domains == {"train": {"mnist", "fashionmnist"}, "val": {"mnist", "fashionmnist"}, "test": {"kmnist"},
                       "tune": {"kmnist"}}
    assert source.tuning_split(cfg) == "tune" and source.held_out(cfg) == "kmnist"
    test, tune = source.dataset(cfg, "test"), source.dataset(cfg, "tune")
    assert not set(test.class_names) & set(tune.class_names)
    info = source.info(cfg)
    assert info.num_train_classes == 12 and info.example_shape == (1, 8, 8)


def test_bad_mixtures(folders):
    with pytest.raises(ConfigError, match="holdout"):           # refused when the config resolves
        mixture(folders, holdout="emnist")
    with pytest.raises(ConfigError, match="3 numbers"):
        mixture(folders, weights="[1, 2]")
    cfg, source = mixture(folders)
    with pytest.raises(EpisodeError, match="domain 'mnist'"):
        source.sampler(cfg, "val", 3, 1, 1, 1, 0)                        # 2 val classes per domain


@pytest.mark.integration
def test_training_on_a_mixture_and_bscd_fsl_needs_a_held_out_target(folders, tmp_path):
    from metamap.train.run import train
    base = ["model.hidden=8", "model.layers=3", "train.steps=2", "train.val_every=0", "train.report=false", "episode.ways=2",
            "episode.queries=1", "eval.ways=[2]", "eval.queries=2", "eval.episodes=3", "eval.shots=[1]"]
    cfg, _ = mixture(folders, *base, holdout="kmnist")
    summary = train(cfg, tmp_path / "run", progress=False, echo=lambda *_: None)
    assert summary["test"][0]["episodes"] == 3
    cfg, _ = mixture(folders, *base, "eval.protocol='bscd-fsl'")
    with pytest.raises(ConfigError, match="never meta-trained on"):
        train(cfg, tmp_path / "run2", progress=False, echo=lambda *_: None)
    assert cfg["eval"]["shots"] == [1, 5, 20, 50] and cfg["eval"]["episodes"] == 600


def test_mixture_config_round_trips_through_toml(folders):
    import tomllib
    cfg, _ = mixture(folders, holdout="kmnist")
    assert tomllib.loads(configlib.dumps(cfg)) == cfg


def test_validation_falls_back_to_the_largest_setting_the_val_split_can_sample(folders, monkeypatch):
    """9 examples per class: 8 shots + 2 queries cannot be drawn, so validation runs 1-shot
    episodes instead of being skipped (which left training with no model selection)."""
    from metamap.train import run
    monkeypatch.setattr(run, "evaluate", lambda learner, sampler, *a, **k: sampler)
    learner = torch.nn.Module()
    cfg, source = mixture(folders, "eval.ways=[2]", "eval.shots=[1, 8]", "eval.queries=2", holdout="kmnist")
    sampler = run.make_validation(learner, cfg, source, "cpu", torch.contiguous_format)()
    assert (sampler.ways, sampler.shots, sampler.queries) == (2, 1, 2)
    cfg, source = mixture(folders, "eval.ways=[2]", "eval.shots=[8]", "eval.queries=2", holdout="kmnist")
    with pytest.warns(UserWarning, match="validation skipped: no eval setting.*2-way 8-shot"):
        assert run.make_validation(learner, cfg, source, "cpu", torch.contiguous_format) is None
