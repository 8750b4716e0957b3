"""Test-time fine-tuning: never touches the checkpoint, same seed same result, selection blind to test classes,
every learner fine-tunes through the one evaluator."""
import hashlib

import pytest
import torch

from metamap import config as configlib
from metamap.errors import ConfigError
from metamap.registry import data_source
from metamap.train import test_time
from metamap.train.checkpoint import load_learner
from metamap.train.evaluate import evaluate
from metamap.train import run as runlib
from tests.learner_helpers import episode, learner

QUIET = dict(progress=False, echo=lambda *_: None)


def folder_overrides(folder):
    return ["data.name='folder'", f"data.path='{folder}'", "data.fractions=[0.3, 0.3, 0.4]",
            "data.image_size=16", "model.hidden=8", "train.steps=2", "train.val_every=0", "train.log_every=1",
            "train.report=false", "episode.ways=3", "episode.queries=2", "eval.ways=[3]", "eval.queries=2",
            "eval.episodes=4", "train.precision='fp32'"]


@pytest.fixture(scope="module")
def folder(image_folder, tmp_path_factory):
    """A copy of the shared image folder: its split file (3 / 3 / 4 classes) is ours alone."""
    import shutil
    copy = tmp_path_factory.mktemp("tt-data") / "data"
    shutil.copytree(image_folder, copy, ignore=shutil.ignore_patterns("metamap-split.json"))
    return copy


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory):
    path = tmp_path_factory.mktemp("tt") / "run"
    runlib.train(configlib.resolve(overrides=folder_overrides(folder)), path, run_test=False, **QUIET)
    return path


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


FAST = ["eval.finetune=true", "eval.finetune_steps_grid=[1, 3]", "eval.finetune_episodes=2",
        "eval.finetune_lrs=[0.0, 0.01]"]


@pytest.mark.integration
def test_never_touches_the_checkpoint_and_repeats_exactly(run):
    before = digests(run)
    a = runlib.evaluate_checkpoint(run, FAST, **QUIET)
    b = runlib.evaluate_checkpoint(run, FAST, **QUIET)
    assert digests(run) == before
    assert a[0].scores == b[0].scores and a[0].finetune == b[0].finetune
    assert a[0].finetune["chosen_on"].startswith("chosen on 2 episodes of the validation classes")
    assert set(a[0].finetune["scores"]) == {"lr=0,steps=0", "lr=0.01,steps=1", "lr=0.01,steps=3"}


@pytest.mark.integration
def test_given_values_and_another_seed(run):
    given = runlib.evaluate_checkpoint(run, ["eval.finetune=true", "eval.finetune_lr=0.05", "eval.finetune_steps=3"],
                                **QUIET)[0]
    assert given.finetune == {"lr": 0.05, "steps": 3, "chosen_on": "given", "scores": {}}
    other = runlib.evaluate_checkpoint(run, ["eval.finetune=true", "eval.finetune_lr=0.05", "eval.finetune_steps=3",
                                      "eval.seed=5"], **QUIET)[0]
    assert other.seed == 5 and other.scores != given.scores


def test_weights_in_memory_are_restored_and_lr_zero_is_plain(run, folder):
    learner_ = load_learner(run).learner
    config = configlib.resolve(overrides=folder_overrides(folder), base=None)
    sampler = runlib.test_samplers(config, data_source(config))[0]
    before = {k: v.clone() for k, v in learner_.state_dict().items()}
    tuned = evaluate(learner_, sampler, 4, progress=False, finetune=test_time.FineTuning(0.05, 3))
    assert all(torch.equal(before[k], v) for k, v in learner_.state_dict().items())
    plain = evaluate(learner_, sampler, 4, progress=False)
    zero = evaluate(learner_, sampler, 4, progress=False, finetune=test_time.FineTuning(0.0, 3))
    assert zero.scores == pytest.approx(plain.scores, abs=1e-6)
    assert tuned.scores != plain.scores or tuned.mean == plain.mean


def test_selection_sees_only_validation_classes(run, folder):
    learner_ = load_learner(run).learner
    config = configlib.resolve(overrides=folder_overrides(folder) + FAST)
    source = data_source(config)
    val, test = source.dataset(config, "val"), source.dataset(config, "test")
    seen = []
    original = learner_.finetune_loss

    def spy(support_x, *args):
        seen.append(support_x.detach().clone())
        return original(support_x, *args)
    learner_.finetune_loss = spy
    sampler = runlib.test_samplers(config, source)[0]
    runlib.finetune_for(learner_, config, source, sampler, "test")
    assert seen
    rows = lambda ds: {tuple(r.flatten().tolist()) for r in ds.inputs(torch.arange(len(ds)))}
    val_rows, test_rows = rows(val), rows(test)
    for x in seen:
        for image in x[0]:
            key = tuple(image.flatten().tolist())
            assert key in val_rows and key not in test_rows


def test_selection_refuses_shared_classes_and_needs_a_test_split(run, folder, monkeypatch):
    learner_ = load_learner(run).learner
    config = configlib.resolve(overrides=folder_overrides(folder) + FAST)
    source = data_source(config)
    sampler = runlib.test_samplers(config, source)[0]
    with pytest.raises(ConfigError, match="give them instead"):
        runlib.finetune_for(learner_, config, source, sampler, "val")
    monkeypatch.setattr(type(source), "dataset", lambda self, cfg, split: type(source).splits(
        self, cfg)["test"])                              # val = test: the same classes
    with pytest.raises(ConfigError, match="share"):
        runlib.finetune_for(learner_, config, source, sampler, "test")


def test_augment_is_seeded_and_shifts_by_whole_pixels():
    x = torch.randn(4, 1, 16, 16)
    g = lambda: test_time.episode_generator(3, 7)
    assert torch.equal(test_time.augment(x, g()), test_time.augment(x, g()))
    assert not torch.equal(test_time.augment(x, g()), test_time.augment(x, test_time.episode_generator(3, 8)))
    shifted = test_time.translate(x, g())
    for a, b in zip(x, shifted):           # every shifted image is a window of the padded original
        matches = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)
                   if torch.equal(b[:, max(dy, 0):16 + min(dy, 0), max(dx, 0):16 + min(dx, 0)],
                                  a[:, max(-dy, 0):16 + min(-dy, 0), max(-dx, 0):16 + min(-dx, 0)])]
        assert matches
    assert torch.equal(test_time.augment(x, g(), prob=0.0), x)


@pytest.mark.parametrize("name", ["protonet", "matching", "relation", "siamese", "maml", "finetune", "mann"])
def test_every_learner_fine_tunes_and_is_restored(name):
    extra = ["episode.ways=3"] if name == "maml" else []
    model = learner(name, *extra).eval()
    tasks = episode(tasks=2, ways=3, shots=2, queries=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = test_time.FineTuning(0.01, 3)
    first = test_time.finetune_predictions(model, tasks, [0, 1], cfg, [0, 3])
    again = test_time.finetune_predictions(model, tasks, [0, 1], cfg, [0, 3])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(first[1], again[1])
    assert first[1].shape == (2, 6, 3)
    assert not torch.allclose(first[0], first[1])              # three steps changed the predictions


def test_bad_finetune_keys():
    with pytest.raises(ConfigError, match="finetune_lr"):
        configlib.resolve(overrides=["eval.finetune=true", "eval.finetune_lr=-1"])
    with pytest.raises(ConfigError, match="finetune_augment"):
        configlib.resolve(overrides=["eval.finetune_augment=['mixup']"])
    with pytest.raises(ConfigError, match="eval.finetune must be"):
        configlib.resolve(overrides=["eval.finetune='sometimes'"])


@pytest.mark.integration
def test_predict_fine_tunes_given_or_chosen_on_other_classes(run, folder, tmp_path, capsys):
    import shutil

    from metamap.cli import main
    image_folder = folder
    classes = sorted(p.name for p in image_folder.iterdir() if p.is_dir())
    support, query, other = tmp_path / "support", tmp_path / "query", tmp_path / "other"
    query.mkdir()
    for c in classes[:3]:
        (support / c).mkdir(parents=True)
        shutil.copy(sorted((image_folder / c).glob("*.png"))[0], support / c / "0.png")
        shutil.copy(sorted((image_folder / c).glob("*.png"))[1], query / f"{c}.png")
    for c in classes[3:7]:
        shutil.copytree(image_folder / c, other / c)
    before = digests(run)
    out = tmp_path / "p.csv"
    args = ["predict", "--checkpoint", str(run), "--support", str(support), "--query", str(query), "--out", str(out)]
    assert main(args + ["--finetune-lr", "0.01", "--finetune-steps", "2"]) == 0
    assert "lr 0.01, 2 steps (given)" in capsys.readouterr().err
    assert main(args + ["--finetune-select", str(other), "--finetune-steps", "2"]) == 0
    err = capsys.readouterr().err
    assert f"chosen on 5 episodes of {other}" in err and (tmp_path / "p.csv.finetune.json").exists()
    assert len(out.read_text().splitlines()) == 4 and digests(run) == before
    shutil.copytree(support / classes[0], other / classes[0])
    assert main(args + ["--finetune-select", str(other)]) == 2          # shares a class with the support set
    assert "shares class" in capsys.readouterr().err
    assert main(args + ["--finetune-steps", "2"]) == 2                   # nothing to choose the lr on
