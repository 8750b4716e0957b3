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
