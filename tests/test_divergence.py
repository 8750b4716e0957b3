"""A non-finite loss never reaches the weights; too many stop the run with the last good checkpoint."""
import json

import pytest
import torch
from safetensors.torch import load_file

from metamap.algorithms.protonet import PrototypicalNetwork
from metamap.errors import DivergenceError
from metamap.nets import Conv4
from metamap.tasks.sampler import EpisodeSampler
from metamap.train.trainer import Trainer
from tests.test_training import folder_config

pytestmark = pytest.mark.integration      # CLI runs, training runs, processes


class Poisoned(PrototypicalNetwork):
    """Gives a NaN loss on the batches in ``bad``."""

    def __init__(self, bad):
        super().__init__(Conv4(hidden=8, image_size=8, layers=2), example_dims=3)
        self.bad, self.calls = set(bad), 0

    def meta_loss(self, tasks):
        loss, metrics = super().meta_loss(tasks)
        self.calls += 1
        return (loss * float("nan") if self.calls - 1 in self.bad else loss), metrics


def make_trainer(tiny_dataset, tmp_path, bad, limit, image_folder):
    config = folder_config(image_folder, steps=8, **{"train.max_bad_steps": limit, "train.checkpoint_every": 1})
    learner = Poisoned(bad)
    sampler = EpisodeSampler(tiny_dataset, 3, 1, 2, seed=0)
    return Trainer(learner, sampler, config, tmp_path / "run", meta={"learner": "protonet"}, progress=False)


def test_bad_steps_are_skipped_and_logged(tiny_dataset, tmp_path, image_folder):
    trainer = make_trainer(tiny_dataset, tmp_path, bad={2}, limit=3, image_folder=image_folder)
    (tmp_path / "run").mkdir()
    for _ in range(2):
        assert trainer.train_step() is not None
    before = {k: v.clone() for k, v in trainer.learner.state_dict().items()}
    moments = {k: v.clone() for k, v in trainer.optimizer.state_dict()["state"][0].items()}
    assert trainer.train_step() is None                                  # batch 2: NaN loss
    assert all(torch.equal(before[k], v) for k, v in trainer.learner.state_dict().items())
    assert all(torch.equal(moments[k], v) for k, v in trainer.optimizer.state_dict()["state"][0].items())
    trainer.fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in rows if r.get("event") == "non-finite"]
    assert len(events) == 1 and events[0]["batch_index"] == 2 and events[0]["loss"] == "nan"
    assert trainer.step == 8 and trainer.bad_steps == 1


def test_too_many_bad_steps_stop_the_run_keeping_the_last_good_checkpoint(tiny_dataset, tmp_path, image_folder):
    trainer = make_trainer(tiny_dataset, tmp_path, bad={3, 4, 5}, limit=2, image_folder=image_folder)
    with pytest.raises(DivergenceError, match="max_bad_steps = 2"):
        trainer.fit()
    saved = load_file(tmp_path / "run" / "last" / "weights.safetensors")
    assert all(torch.isfinite(v.float()).all() for v in saved.values())
    meta = json.loads((tmp_path / "run" / "last" / "checkpoint.json").read_text())
    assert meta["bad_steps"] == 2          # batches 3 and 4 skipped and saved as such; batch 5 stopped the run
    assert all(torch.equal(saved[k], v) for k, v in trainer.learner.state_dict().items())


class RunawayStatistics(PrototypicalNetwork):
    """A finite loss, but the forward pass of batch ``bad`` leaves an infinite running variance."""

    def __init__(self, bad):
        super().__init__(Conv4(hidden=8, image_size=8, layers=2), example_dims=3)
        self.bad, self.calls = bad, 0

    def meta_loss(self, tasks):
        out = super().meta_loss(tasks)
        if self.calls == self.bad:
            next(m for m in self.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_var.data.fill_(float("inf"))
        self.calls += 1
        return out


def test_non_finite_running_statistics_skip_the_batch_and_are_restored(tiny_dataset, tmp_path, image_folder):
    config = folder_config(image_folder, steps=4, **{"train.checkpoint_every": 1})
    learner = RunawayStatistics(bad=1)
    trainer = Trainer(learner, EpisodeSampler(tiny_dataset, 3, 1, 2, seed=0), config, tmp_path / "run",
                      meta={"learner": "protonet"}, progress=False)
    trainer.fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["batch_index"] for r in rows if r.get("event") == "non-finite"] == [1]
    saved = load_file(tmp_path / "run" / "last" / "weights.safetensors")
    assert all(torch.isfinite(v.float()).all() for v in saved.values())


def cli_train(folder, run, *extra):
    from metamap.cli import main
    return main(["train", "--data", "folder", "--set", f"data.path={folder}", "--set", "data.fractions=[0.5,0.2,0.3]",
                 "--ways", "3", "--queries", "2", "--set", "model.hidden=8", "--set", "train.val_every=0",
                 "--set", "train.checkpoint_every=2", "--set", "train.threads=1", "--set", "train.report=false",
                 "--no-test", "-q", *extra, *(["--run-dir", str(run)] if "--resume" not in extra else [])])


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_a_huge_learning_rate_stops_the_run_at_once_keeping_the_last_good_checkpoint(image_folder, tmp_path,
                                                                                      capsys, optim):
    run = tmp_path / "run"
    assert cli_train(image_folder, run, "--steps", "2", "--set", f"optim.name='{optim}'") == 0
    good = load_file(run / "last" / "weights.safetensors")
    capsys.readouterr()
    assert cli_train(image_folder, run, "--resume", str(run), "--steps", "8", "--lr", "1e6") == 2
    err = capsys.readouterr().err
    assert "training diverged at batch 2" in err and "optim.lr = 1e+06" in err and "Traceback" not in err
    assert f"the last good checkpoint is {run / 'last'} (step 2)" in err
    meta = json.loads((run / "last" / "checkpoint.json").read_text())
    assert meta["step"] == 2
    now = load_file(run / "last" / "weights.safetensors")
    assert all(torch.equal(good[k], now[k]) for k in good)
    # From the start, too: nothing at all is saved.
    assert cli_train(image_folder, tmp_path / "fresh", "--steps", "4", "--lr", "1e6", "--set",
                     f"optim.name='{optim}'") == 2
    assert "no checkpoint had been written yet" in capsys.readouterr().err
    assert not (tmp_path / "fresh" / "last").exists()


def test_weight_growth_limit_is_a_config_key(tiny_dataset, tmp_path, image_folder):
    from metamap import config as configlib
    from metamap.errors import ConfigError
    with pytest.raises(ConfigError, match="train.max_weight_growth must be a number >= 0"):
        configlib.resolve(overrides=["train.max_weight_growth=-1"])
    # A growth of 10x in one step is legitimate for these tiny weights; a limit of 1.0001x is not met.
    config = folder_config(image_folder, steps=3, **{"train.max_weight_growth": 1.0001, "optim.lr": 0.5})
    learner = PrototypicalNetwork(Conv4(hidden=8, image_size=8, layers=2), example_dims=3)
    trainer = Trainer(learner, EpisodeSampler(tiny_dataset, 3, 1, 2, seed=0), config, tmp_path / "run",
                      meta={"learner": "protonet"}, progress=False)
    with pytest.raises(DivergenceError, match=r"times its .* at the start \(limit train.max_weight_growth = 1.0001\)"):
        trainer.fit()


def test_a_nan_inner_step_size_is_refused_before_training(image_folder, tmp_path, capsys):
    code = cli_train(image_folder, tmp_path / "run", "--learner", "maml", "--steps", "3", "--meta-batch", "2",
                     "--set", "learner.inner_lr=nan", "--set", "eval.ways=[3]", "--ways", "3",
                     "--set", "learner.cpp_kernels=false")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "inner_lr" in err                       # refused at resolve, or at the very first batch
    assert not (tmp_path / "run" / "last").exists()
