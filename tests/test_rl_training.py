"""Meta-RL learners through the unchanged trainer, evaluator, checkpoints and CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from metamap import config as configlib
from metamap.cli import main
from metamap.errors import ConfigError
from metamap.train.run import build, evaluate_checkpoint, train

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TINY = ["data.name='navigation2d'", "data.horizon=10", "episode.tasks_per_batch=3", "learner.trajectories=4",
        "eval.episodes=6", "train.threads=1", "train.checkpoint_every=1"]


def cfg(learner: str, steps: int, *extra: str) -> dict:
    return configlib.resolve(overrides=[f"learner.name='{learner}'", f"train.steps={steps}", *TINY, *extra])


def weights(run_dir, name="last"):
    return load_file(run_dir / name / "weights.safetensors")


@pytest.mark.parametrize("learner,extra", [
    ("maml-trpo", ["learner.hidden=[16, 16]"]),
    ("rl2", ["learner.hidden=8", "learner.episodes=2"]),
    ("maml-promp", ["learner.hidden=[16]"]),
])
def test_training_resumes_exactly(tmp_path, learner, extra):
    whole = tmp_path / "whole"
    train(cfg(learner, 3, *extra), whole, progress=False, run_test=False, echo=lambda *a: None)
    part = tmp_path / "part"
    train(cfg(learner, 1, *extra), part, progress=False, run_test=False, echo=lambda *a: None)
    train(cfg(learner, 3, *extra), resume=part, progress=False, run_test=False, echo=lambda *a: None)
    a, b = weights(whole), weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert {"return_0", "return_1", "kl", "entropy", "env_steps_per_s"} <= set(log[-1])


def test_trpo_step_through_the_trainer_lands_on_the_line_searched_parameters(tmp_path):
    config = cfg("maml-trpo", 1, "learner.hidden=[8]")
    _, _, learner = build(config)
    start = {n: p.detach().clone() for n, p in learner.named_parameters()}
    from metamap.rl.tasks import RLSource
    sampler = RLSource().sampler(config, "train", 0, 0, 0, 3, config["seed"])
    batch = sampler.batch(0)
    learner.meta.trpo_update(learner.meta.collect(batch.tasks(), batch.seeds))
    expected = {n: p.detach().clone() for n, p in learner.named_parameters()}
    assert any(not torch.equal(start[n], expected[n]) for n in start)
    run = tmp_path / "run"
    train(config, run, progress=False, run_test=False, echo=lambda *a: None)
    got = weights(run)
    for n, v in expected.items():
        torch.testing.assert_close(got[n], v, rtol=0, atol=1e-6)


def test_eval_of_a_checkpoint_repeats_the_test_of_training(tmp_path):
    run = tmp_path / "run"
    summary = train(cfg("pretrained", 1, "learner.hidden=[8]"), run, progress=False, echo=lambda *a: None)
    (tested,) = summary["test"]
    assert tested["metric"] == "return_1" and set(tested["others"]) == {"return_0", "return_2", "return_3"}
    (again,) = evaluate_checkpoint(run, progress=False, echo=lambda *a: None)
    assert again.mean == tested["mean"] and again.higher_is_better and again.episodes == 6
    assert {k: v["mean"] for k, v in again.others.items()} == {k: v["mean"] for k, v in tested["others"].items()}


def test_oracle_does_not_adapt_and_rl2_scores_episodes(tmp_path):
    config = cfg("oracle", 0, "learner.hidden=[8]")
    _, _, oracle = build(config)
    from metamap.rl.tasks import RLSource
    tasks = RLSource().sampler(config, "test", 0, 0, 0, 1, 9).episodes([0, 1])
    scores = oracle.score_tasks(tasks)
    assert list(scores) == ["return_0", "return_1", "return_2", "return_3"]
    assert all(torch.equal(scores["return_0"], v) for v in scores.values())
    _, _, rl2 = build(cfg("rl2", 0, "learner.hidden=8", "learner.eval_trajectories=2"))
    per = rl2.score_tasks(tasks)
    trials = rl2.rl2.collect(tasks.tasks(), tasks.seeds(0), 4, 2)
    for k in range(4):
        torch.testing.assert_close(per[f"return_{k}"], trials.episode_returns()[..., k].mean(1).double())


def test_cli_train_and_eval(tmp_path, capsys):
    run = tmp_path / "cli"
    args = ["train", "--learner", "oracle", "--data", "navigation2d", "--steps", "1", "--run-dir", str(run),
            "--set", "data.horizon=10", "--set", "learner.hidden=[8]", "--set", "learner.trajectories=3",
            "--meta-batch", "2", "--episodes", "6", "--threads", "1", "-q"]
    assert main(args) == 0
    assert main(["eval", "--checkpoint", str(run), "-q", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "return_0" in out and "oracle" in out
    assert len(json.loads((tmp_path / "r.json").read_text())[0]["scores"]) == 6


def test_random_baseline_is_the_untrained_initialisation(tmp_path):
    config = cfg("random", 0, "learner.hidden=[8]")
    assert config["train"]["steps"] == 0
    run = tmp_path / "random"
    train(config, run, progress=False, run_test=False, echo=lambda *a: None)
    _, _, fresh = build(config)
    for n, v in fresh.state_dict().items():
        assert torch.equal(weights(run, "best")[n], v)


def test_bad_requests_are_refused_clearly(tmp_path):
    with pytest.raises(ConfigError, match="RL task family"):
        build(configlib.resolve(overrides=["learner.name='maml-trpo'"]))
    with pytest.raises(ConfigError, match="chunk_tasks"):
        train(cfg("maml-trpo", 1, "train.chunk_tasks=1", "learner.hidden=[8]"), tmp_path / "c",
              progress=False, run_test=False, echo=lambda *a: None)
    with pytest.raises(ConfigError, match="outer"):
        build(cfg("maml-trpo", 1, "learner.outer='adam'"))


def test_task_batches_are_pure_functions_of_seed_and_index():
    config = cfg("maml-trpo", 1)
    from metamap.rl.tasks import RLSource
    s1 = RLSource().sampler(config, "train", 0, 0, 0, 4, 3)
    s2 = RLSource().sampler(config, "train", 0, 0, 0, 4, 3)
    assert torch.equal(s1.batch(5).params, s2.batch(5).params)
    assert not torch.equal(s1.batch(5).params, s1.batch(6).params)
    halves = [s1.batch(5, rank, 2).params for rank in range(2)]
    assert torch.equal(torch.cat(halves), s1.batch(5).params)
    test = RLSource().sampler(config, "test", 0, 0, 0, 4, 3)
    assert not torch.equal(test.batch(5).params, s1.batch(5).params)
    assert np.allclose(s1.episodes([2, 3]).params.numpy(), np.stack([s1.task_params(2, 0), s1.task_params(3, 0)]))
