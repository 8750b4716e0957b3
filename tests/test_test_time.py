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
        "eval.finetune_lrs=[0.0, 0.01]", "eval.finetune_norms=[0.0, 1.0]"]


@pytest.mark.integration
def test_never_touches_the_checkpoint_and_repeats_exactly(run):
    before = digests(run)
    a = runlib.evaluate_checkpoint(run, FAST, **QUIET)
    b = runlib.evaluate_checkpoint(run, FAST, **QUIET)
    assert digests(run) == before
    assert a[0].scores == b[0].scores and a[0].finetune == b[0].finetune
    assert a[0].finetune["chosen_on"].startswith("chosen on 2 episodes of the validation classes")
    norm = a[0].finetune["norm"]
    assert set(a[0].finetune["scores"]) == {"norm=0,lr=0,steps=0", "norm=1,lr=0,steps=0",
                                            f"norm={norm:g},lr=0.01,steps=1", f"norm={norm:g},lr=0.01,steps=3"}
    assert a[0].finetune["rule"] == "paired"


@pytest.mark.integration
def test_given_values_and_another_seed(run):
    keys = ["eval.finetune=true", "eval.finetune_lr=0.05", "eval.finetune_steps=3", "eval.finetune_norm=0.5"]
    given = runlib.evaluate_checkpoint(run, keys, **QUIET)[0]
    assert given.finetune == {"lr": 0.05, "steps": 3, "chosen_on": "given", "scores": {}, "norm": 0.5,
                              "params": "all", "rule": "given"}
    other = runlib.evaluate_checkpoint(run, keys + ["eval.seed=5"], **QUIET)[0]
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
    seen, calls = [], []
    original = learner_.adapt_tasks

    def spy(support_x, *args):        # every support set adapted to: statistics, fine-tuning, prediction
        seen.append(support_x.detach().clone())
        calls.append(torch.is_grad_enabled())
        return original(support_x, *args)
    learner_.adapt_tasks = spy
    sampler = runlib.test_samplers(config, source)[0]
    runlib.finetune_for(learner_, config, source, sampler, "test")
    assert seen and True in calls and False in calls      # the statistics pass and the fine-tuning both ran
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
    with pytest.raises(ConfigError, match="finetune_norm"):
        configlib.resolve(overrides=["eval.finetune=true", "eval.finetune_norm=1.5"])
    with pytest.raises(ConfigError, match="finetune_rule"):
        configlib.resolve(overrides=["eval.finetune_rule='luck'"])


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
    assert main(args + ["--finetune-select", str(other), "--finetune-steps", "2", "--finetune-episodes", "4"]) == 0
    err = capsys.readouterr().err
    assert f"chosen on 4 episodes of {other}" in err and (tmp_path / "p.csv.finetune.json").exists()
    assert len(out.read_text().splitlines()) == 4 and digests(run) == before
    shutil.copytree(support / classes[0], other / classes[0])
    assert main(args + ["--finetune-select", str(other)]) == 2          # shares a class with the support set
    assert "shares class" in capsys.readouterr().err
    assert main(args + ["--finetune-steps", "2"]) == 2                   # nothing to choose the lr on


# -- the paired decision rule and batch-norm statistics (eval.finetune_rule, eval.finetune_norm) ------------
def test_paired_gain_exact():
    reference = torch.tensor([0.5, 0.6, 0.7, 0.8], dtype=torch.float64)
    candidate = torch.tensor([0.6, 0.6, 0.9, 0.8], dtype=torch.float64)      # gains 0.1, 0, 0.2, 0
    mean, low = test_time.paired_gain(candidate, reference)
    sd = (((0.1 - 0.075) ** 2 + 0.075 ** 2 + 0.125 ** 2 + 0.075 ** 2) / 3) ** 0.5
    assert mean == pytest.approx(0.075, abs=1e-12)
    assert low == pytest.approx(0.075 - 1.959963984540054 * sd / 2, abs=1e-12)
    assert test_time.paired_gain(candidate[:1], reference[:1]) == pytest.approx((0.1, 0.1))


def test_decide_keeps_the_reference_unless_the_gain_is_clear():
    reference = torch.full((10,), 0.80, dtype=torch.float64)
    # "lucky": the best mean (+3 points) from two episodes out of ten -- no clear gain
    lucky = reference.clone()
    lucky[:2] += 0.15
    # "steady": +1 point on every episode, a clear gain
    steady = reference + 0.01
    worse = reference - 0.02
    assert test_time.decide(reference, {"lucky": lucky}) is None
    assert test_time.decide(reference, {"worse": worse}) is None
    assert test_time.decide(reference, {"lucky": lucky, "steady": steady}) == "steady"
    assert test_time.decide(reference, {"lucky": lucky, "steady": steady}, rule="mean") == "lucky"
    assert test_time.decide(reference, {"a": steady, "b": steady.clone()}) == "a"       # a tie: the cheaper
    assert test_time.decide(reference, {}) is None


def tiny_bn_learner():
    model = learner("protonet").eval()
    with torch.no_grad():                  # running statistics unlike any batch's (yet not all-dead ReLUs)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.fill_(0.1)
                m.running_var.fill_(4.0)
    return model


def test_norm_statistics_are_the_support_sets_mixed_layer_by_layer():
    model = tiny_bn_learner()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    tasks = episode(tasks=1, ways=3, shots=2, queries=2)
    seen = []
    hook = bns[1].register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()))
    x = tasks.support_x.flatten(0, 1).double()
    first = model.encoder.features[0][0]
    conv = torch.nn.functional.conv2d(x, first.weight.double(), first.bias.double(), padding=1)
    mean, var = conv.mean((0, 2, 3)), conv.var((0, 2, 3), unbiased=True)
    assert test_time.adapt_norm_statistics(model, tasks.support_x, tasks.support_y, 3, 0.25) == len(bns)
    hook.remove()
    assert torch.allclose(bns[0].running_mean.double(), 0.75 * 0.1 + 0.25 * mean, atol=1e-5)
    assert torch.allclose(bns[0].running_var.double(), 0.75 * 4.0 + 0.25 * var, atol=1e-4)
    # the second layer's statistics are of its input as normalised with the first layer's new ones
    x2 = seen[0].double()
    mix = lambda old, new: 0.75 * old + 0.25 * new
    assert torch.allclose(bns[1].running_mean.double(), mix(0.1, x2.mean((0, 2, 3))), atol=1e-5)
    assert torch.allclose(bns[1].running_var.double(), mix(4.0, x2.var((0, 2, 3), unbiased=True)), atol=1e-4)
    assert test_time.adapt_norm_statistics(model, tasks.support_x, tasks.support_y, 3, 0.0) == 0


def test_norm_adaptation_is_undone_after_each_episode_and_changes_predictions():
    model = tiny_bn_learner()
    tasks = episode(tasks=2, ways=3, shots=2, queries=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain, = test_time.finetune_predictions(model, tasks, [0, 1], test_time.FineTuning(0.0, 0))
    adapted, = test_time.finetune_predictions(model, tasks, [0, 1], test_time.FineTuning(0.0, 0, norm=1.0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.allclose(plain, model.adapt_tasks(tasks.support_x, tasks.support_y, 3)(tasks.query_x))
    assert not torch.allclose(plain, adapted)


def test_norm_params_tune_only_the_normalisation_layers():
    model = tiny_bn_learner()
    tasks = episode(tasks=1, ways=3, shots=2, queries=2)
    seen = {}
    cfg = test_time.FineTuning(0.05, 2, params="norm")
    for _, predictor in test_time.trajectory(model, tasks.support_x, tasks.support_y, 3, cfg):
        seen = {k: v.clone() for k, v in model.state_dict().items()}
    model2 = tiny_bn_learner()
    start = model2.state_dict()
    changed = {k for k in start if not torch.equal(start[k], seen[k])}
    assert changed and all(".1." in k and k.rsplit(".", 1)[1] in ("weight", "bias") for k in changed)


class _Episodes:
    """A sampler stand-in: fixed random episodes."""

    def __init__(self, tasks):
        self.tasks = tasks

    def episodes(self, ids):
        from metamap.tasks.batch import TaskBatch
        t = self.tasks
        return TaskBatch(t.support_x[ids], t.support_y[ids], t.query_x[ids], t.query_y[ids], t.ways,
                         t.classes[ids])


def test_select_is_seeded_and_records_every_candidate():
    model = tiny_bn_learner()
    sampler = _Episodes(episode(tasks=4, ways=3, shots=2, queries=3, seed=1))
    base = test_time.FineTuning(0.0, 0, seed=7)
    run = lambda: test_time.select(model, sampler, 4, [0.0, 0.01], [1, 2], base, "here", norms=[0.0, 1.0])
    a, b = run(), run()
    assert a == b
    assert set(a.scores) == {"norm=0,lr=0,steps=0", "norm=1,lr=0,steps=0",
                             f"norm={a.norm:g},lr=0.01,steps=1", f"norm={a.norm:g},lr=0.01,steps=2"}
    assert a.scores["norm=0,lr=0,steps=0"]["gain"] == 0.0
    # the pick follows the rule on the recorded figures
    norm_low = a.scores["norm=1,lr=0,steps=0"]["low"]
    assert a.norm == (1.0 if norm_low > 0 else 0.0)
    lows = {s: a.scores[f"norm={a.norm:g},lr=0.01,steps={s}"]["low"] for s in (1, 2)}
    best = max(lows, key=lambda s: (lows[s], -s))
    assert (a.lr, a.steps) == ((0.01, best) if lows[best] > 0 else (0.0, 0))
