"""Few-shot regression: task families, seeded sampling, the evaluator's MSE, the plot."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metamap import config as configlib
from metamap.errors import ConfigError
from metamap.registry import build_learner, data_source
from metamap.report.regression import regression_tasks
from metamap.tasks.regression import RegressionSampler
from metamap.train.evaluate import evaluate


def test_sinusoid_tasks_follow_their_parameters_and_ranges():
    s = RegressionSampler("sinusoid", shots=10, queries=20, tasks_per_batch=64, seed=3)
    b = s.batch(0)
    assert b.support_x.shape == (64, 10, 1) and b.support_y.shape == (64, 10) and b.query_y.shape == (64, 20)
    params = torch.tensor(np.stack([s.task_params(0, p) for p in range(64)]))
    amp, phase = params[:, 0:1], params[:, 1:2]
    assert bool((amp >= 0.1).all() and (amp <= 5).all() and (phase >= 0).all() and (phase <= math.pi).all())
    x = torch.cat([b.support_x, b.query_x], 1)[..., 0].double()
    y = torch.cat([b.support_y, b.query_y], 1).double()
    assert bool((x.abs() <= 5).all())
    torch.testing.assert_close(y, amp * torch.sin(x - phase), rtol=0, atol=1e-5)


def test_linear_tasks_are_lines():
    s = RegressionSampler("linear", shots=4, queries=4, tasks_per_batch=8, seed=0)
    b = s.batch(2)
    params = torch.tensor(np.stack([s.task_params(2, p) for p in range(8)]))
    x, y = b.support_x[..., 0].double(), b.support_y.double()
    torch.testing.assert_close(y, params[:, :1] * x + params[:, 1:], rtol=0, atol=1e-5)


def test_tasks_are_pure_functions_of_seed_index_position():
    a = RegressionSampler("sinusoid", 5, 5, tasks_per_batch=6, seed=1)
    b = RegressionSampler("sinusoid", 5, 5, tasks_per_batch=6, seed=1)
    torch.testing.assert_close(a.batch(7).support_y, b.batch(7).support_y, rtol=0, atol=0)
    assert not torch.equal(a.batch(7).support_y, a.batch(8).support_y)
    # Ranks' shares put together are exactly the single-process meta-batch.
    shares = [a.batch(7, rank=r, world_size=4).query_y for r in range(4)]
    torch.testing.assert_close(torch.cat(shares), a.batch(7).query_y, rtol=0, atol=0)
    # Evaluation tasks do not depend on how they are chunked; splits use different streams.
    torch.testing.assert_close(torch.cat([a.episodes(range(0, 3)).support_y, a.episodes(range(3, 5)).support_y]),
                               a.episodes(range(5)).support_y, rtol=0, atol=0)
    test = RegressionSampler("sinusoid", 5, 5, tasks_per_batch=6, seed=1, split="test")
    assert not torch.equal(test.batch(7).support_y, a.batch(7).support_y)


def test_bad_regression_settings_are_refused():
    with pytest.raises(ConfigError, match="unknown regression family"):
        RegressionSampler("cosine", 5, 5)
    with pytest.raises(ConfigError, match="empty"):
        RegressionSampler("sinusoid", 5, 5, ranges={"amplitude": (2.0, 1.0)})


def sinusoid_config(*overrides):
    return configlib.resolve(None, ['learner.name="maml"', 'data.name="sinusoid"', 'model.backbone="mlp"',
                                    "learner.inner_lr=0.01", "learner.inner_steps_eval=2",
                                    "episode.shots=10", "episode.queries=10", *overrides])


def test_config_builds_mlp_1_40_40_1_and_the_evaluator_reports_mse():
    cfg = sinusoid_config()
    source = data_source(cfg)
    info = source.info(cfg)
    assert info.problem == "regression" and info.example_shape == (1,)
    torch.manual_seed(0)
    learner = build_learner(cfg, info)
    sizes = [tuple(p.shape) for p in learner.model.parameters()]
    assert sizes == [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]
    sampler = source.sampler(cfg, "test", 5, 10, 30, 1, 2024)
    result = evaluate(learner, sampler, 20, progress=False)
    assert result.metric == "mse" and result.episodes == 20
    # The evaluator's per-task MSE is the mean squared error of the adapted predictions.
    tasks = sampler.episodes(range(20))
    learner.eval()
    out = learner.adapt_tasks(tasks.support_x, tasks.support_y, 0)(tasks.query_x)
    per_task = ((out[..., 0] - tasks.query_y) ** 2).mean(1).double()
    assert result.mean == pytest.approx(float(per_task.mean()), rel=1e-6)
    assert result.ci95 == pytest.approx(1.96 * float(per_task.std()) / math.sqrt(20), rel=1e-6)
    with pytest.raises(ConfigError, match="unknown key"):
        data_source(cfg).info(configlib.deep_merge(cfg, {"data": {"colour": 1}}, strict=False))


def test_a_few_maml_steps_reduce_the_adapted_loss():
    cfg = sinusoid_config()
    source = data_source(cfg)
    torch.manual_seed(0)
    learner = build_learner(cfg, source.info(cfg))
    opt = torch.optim.Adam(learner.parameters(), lr=1e-2)
    sampler = source.sampler(cfg, "train", 1, 10, 10, 16, 0)
    learner.train()
    losses = []
    for i in range(30):
        loss, _ = learner.meta_loss(sampler.batch(i))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_plot_writes_a_png(tmp_path):
    cfg = sinusoid_config()
    source = data_source(cfg)
    learner = build_learner(cfg, source.info(cfg))
    sampler = source.sampler(cfg, "test", 1, 10, 10, 1, 2024)
    path = tmp_path / "tasks.png"
    regression_tasks(learner, sampler, path, ids=(0, 1), steps=(1, 3))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plot_works_for_a_learner_without_inner_steps(tmp_path):
    from metamap.algorithms.base import MetaLearner

    class SupportMean(MetaLearner):          # predicts each task's mean support target everywhere
        def adapt_tasks(self, support_x, support_y, ways):
            return lambda query_x: support_y.mean(1, keepdim=True).expand(-1, query_x.shape[1]).unsqueeze(-1)

    sampler = RegressionSampler("sinusoid", shots=5, queries=5, seed=1, split="test")
    path = regression_tasks(SupportMean(1), sampler, tmp_path / "tasks.png", ids=(0, 1))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
def test_a_regression_run_reports_its_test_tasks(tmp_path):
    from metamap.train.run import train
    cfg = sinusoid_config("train.steps=2", "train.val_every=0", "eval.episodes=5", "eval.ways=[1]")
    train(cfg, tmp_path / "run", progress=False, echo=lambda *_: None)
    page = (tmp_path / "run" / "report.html").read_text()
    assert 'src="episodes.png"' in page and (tmp_path / "run" / "episodes.png").stat().st_size > 1000
    assert "mse" in page
