"""Task kinds: a kind defined only here (its data source, sampler, loss and metrics) trains,
validates, chooses its best checkpoint, tests and evaluates through the unchanged trainer,
evaluator, checkpoints and CLI."""
from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch
from torch.func import functional_call

from metamap import config as configlib
from metamap.cli import main
from metamap.data.sources import DataSource
from metamap.registry import DataInfo, build_learner, data_source, register_data, register_task_kind, task_kind
from metamap.tasks.batch import TaskBatch
from metamap.tasks.kinds import CLASSIFICATION, REGRESSION, Metric, TaskKind, infer_kind
from metamap.tasks.sampler import shard
from metamap.train.run import train


@register_task_kind("test-l1-maps")
class L1Maps(TaskKind):
    """Vector-valued targets, mean absolute error as the loss; two metrics, opposite directions."""

    metrics = (Metric("mae", higher_is_better=False), Metric("within_half", higher_is_better=True, percent=True))

    def loss(self, outputs, targets):
        return (outputs.reshape(targets.shape) - targets).abs().flatten(1).mean(1)

    def scores(self, outputs, targets):
        err = (outputs.reshape(targets.shape) - targets).abs()
        return {"mae": err.flatten(1).mean(1), "within_half": (err.amax(-1) < 0.5).float().mean(1)}


class L1MapSampler:
    """Tasks y = A x with A ~ N(0, 1)^{2x2} per task, x ~ U[-1, 1]^2; pure functions of the seed."""

    def __init__(self, shots, queries, tasks_per_batch, seed, split):
        self.kind = task_kind("test-l1-maps")
        self.shots, self.queries, self.tasks_per_batch, self.seed = shots, queries, tasks_per_batch, seed
        self.key = zlib.crc32(split.encode())

    @property
    def examples_per_task(self):
        return self.shots + self.queries

    def describe(self):
        return f"linear maps {self.shots}-shot, {self.queries} queries"

    def tasks(self, keys):
        xs, ys = [], []
        for i, p in keys:
            rng = np.random.default_rng([self.seed, self.key, i, p])
            a = rng.normal(size=(2, 2))
            x = rng.uniform(-1, 1, size=(self.shots + self.queries, 2))
            xs.append(x)
            ys.append(x @ a.T)
        x, y = torch.tensor(np.stack(xs), dtype=torch.float32), torch.tensor(np.stack(ys), dtype=torch.float32)
        k = self.shots
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])

    def batch(self, index, rank=0, world_size=1):
        return self.tasks([(index, p) for p in shard(self.tasks_per_batch, rank, world_size)])

    def episodes(self, ids):
        return self.tasks([(int(e), 0) for e in ids])


@register_data("test-l1-maps")
class L1MapSource(DataSource):
    def info(self, config):
        return DataInfo(example_shape=(2,), problem="test-l1-maps", output_dim=2, description="random linear maps")

    def sampler(self, config, split, ways, shots, queries, tasks_per_batch, seed):
        return L1MapSampler(shots, queries, tasks_per_batch, seed, split)


def l1_config(*overrides):
    return configlib.resolve(None, ['data.name="test-l1-maps"', 'learner.name="maml"', 'model.backbone="mlp"',
                                    "model.hidden=[16]", "learner.inner_lr=0.1", "learner.inner_steps=1",
                                    "learner.inner_steps_eval=1", "episode.shots=5", "episode.queries=5",
                                    "episode.tasks_per_batch=4", "optim.lr=0.01", "train.steps=6",
                                    "train.val_every=2", "train.val_episodes=8", "train.log_every=1",
                                    "train.checkpoint_every=2", "eval.episodes=12", "eval.shots=[5]",
                                    "train.report=false", *overrides])


def test_the_learner_adapts_with_the_kinds_loss():
    config = l1_config()
    source = data_source(config)
    torch.manual_seed(0)
    learner = build_learner(config, source.info(config))
    assert learner.kind is task_kind("test-l1-maps")
    tasks = source.sampler(config, "train", 0, 5, 5, 3, 0).batch(0)
    learner.train()
    loss, metrics = learner.meta_loss(tasks)
    assert set(metrics) == {"mae", "within_half"}
    # By hand: one SGD step on each task's mean absolute error, then the query's.
    model, theta = learner.model, dict(learner.model.named_parameters())
    total = 0.0
    for t in range(3):
        l1 = (functional_call(model, theta, (tasks.support_x[t],)) - tasks.support_y[t]).abs().mean()
        grads = torch.autograd.grad(l1, list(theta.values()), create_graph=True)
        fast = {n: v - 0.1 * g for (n, v), g in zip(theta.items(), grads)}
        total = total + (functional_call(model, fast, (tasks.query_x[t],)) - tasks.query_y[t]).abs().mean()
    torch.testing.assert_close(loss, total / 3, rtol=1e-6, atol=1e-7)


@pytest.mark.integration
def test_a_kind_defined_in_the_tests_trains_validates_and_evaluates_unchanged(tmp_path, capsys):
    run = tmp_path / "run"
    summary = train(l1_config(), run, progress=False, echo=lambda *_: None)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r and "event" not in r]
    assert len(steps) == 6 and all({"mae", "within_half"} <= set(r) for r in steps)
    val = [r for r in rows if "val_mae" in r]
    assert [r["step"] for r in val] == [2, 4, 6]
    assert all(r["val_metric"] == "mae" and r["higher_is_better"] is False for r in val)
    # The best checkpoint is the one with the *lowest* validation error.
    best = min(val, key=lambda r: r["val_mae"])
    assert summary["best"]["step"] == best["step"] and summary["best"]["mean"] == best["val_mae"]
    assert [r["best"] for r in val] == [r["val_mae"] == min(v["val_mae"] for v in val[:i + 1])
                                        for i, r in enumerate(val)]
    (result,) = summary["test"]
    assert result["metric"] == "mae" and result["higher_is_better"] is False and result["episodes"] == 12
    assert set(result["others"]) == {"within_half"} and result["others"]["within_half"]["higher_is_better"]
    assert 0 <= result["others"]["within_half"]["mean"] <= 1
    # The CLI evaluates the checkpoint through the same evaluator and prints both metrics.
    assert main(["eval", "--checkpoint", str(run), "--episodes", "12"]) == 0
    out = capsys.readouterr().out
    assert f"{result['mean']:.4f}" in out and "mae" in out and "within_half" in out


def test_kinds_have_directions_and_bare_tensors_infer_theirs():
    assert CLASSIFICATION.primary == Metric("accuracy", True, True)
    assert REGRESSION.primary.name == "mse" and not REGRESSION.primary.higher_is_better
    assert REGRESSION.primary.better(0.1, 0.2) and CLASSIFICATION.primary.better(0.9, 0.8)
    assert infer_kind(torch.tensor([0, 1])) is CLASSIFICATION and infer_kind(torch.tensor([0.5])) is REGRESSION
    assert task_kind("classification") == CLASSIFICATION != REGRESSION
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])            # [T=1, N=2, ways=2]
    labels = torch.tensor([[0, 0]])
    torch.testing.assert_close(CLASSIFICATION.scores(logits, labels)["accuracy"], torch.tensor([0.5]))
    expected = (torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="none")).mean()
    torch.testing.assert_close(CLASSIFICATION.loss(logits, labels), expected.reshape(1))
    with pytest.raises(Exception, match="unknown task kind"):
        task_kind("no-such-kind")
