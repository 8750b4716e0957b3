"""Trainer, checkpoints, resume and the CLI, on a small synthetic image folder."""
import csv
import json

import pytest
import torch
from safetensors.torch import load_file

import metamap
from metamap import config as configlib
from metamap.cli import main
from metamap.errors import CheckpointError
from metamap.train import checkpoint
from metamap.train.run import train

# Log fields that measure the machine, not the training.
MACHINE_DEPENDENT = {"tasks_per_s", "elapsed_s", "rss_mb", "peak_rss_mb", "cuda_peak_mb"}


def folder_config(folder, steps=8, **extra):
    overrides = ["data.name='folder'", f"data.path='{folder}'", "data.fractions=[0.5, 0.2, 0.3]",
                 "model.hidden=8", f"train.steps={steps}", "train.val_every=4", "train.val_episodes=5",
                 "train.checkpoint_every=2", "train.log_every=1", "episode.ways=3", "episode.queries=2",
                 "episode.tasks_per_batch=2", "eval.ways=[3]", "eval.queries=2", "eval.episodes=10",
                 "schedule.step_size=3"]
    return configlib.resolve(overrides=overrides + [f"{k}={v}" for k, v in extra.items()])


def weights(run_dir, name="last"):
    return load_file(run_dir / name / checkpoint.WEIGHTS)


def metrics_without_timing(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in MACHINE_DEPENDENT} for r in rows]


@pytest.mark.integration
def test_train_writes_checkpoints_logs_and_results(image_folder, tmp_path):
    summary = train(folder_config(image_folder), tmp_path / "run", progress=False, echo=lambda *_: None)
    run = tmp_path / "run"
    expected = {"best", "last", "metrics.jsonl", "config.toml", "results.json", "curves.png", "report.html"}
    assert expected <= {p.name for p in run.iterdir()}
    meta = json.loads((run / "last" / checkpoint.META).read_text())
    assert meta["step"] == 8 and meta["learner"] == "protonet" and meta["format"] == checkpoint.FORMAT
    result = summary["test"][0]
    assert result["episodes"] == 10 and 0.0 <= result["mean"] <= 1.0
    assert configlib.load_file(run / "config.toml")["train"]["steps"] == 8
    lrs = [r["lr"] for r in metrics_without_timing(run) if "lr" in r]
    assert lrs[:4] == [1e-3, 1e-3, 1e-3, 5e-4]     # step schedule: halved every 3 batches


@pytest.mark.integration
def test_resume_is_exact(image_folder, tmp_path):
    full = tmp_path / "full"
    train(folder_config(image_folder, steps=8), full, progress=False, run_test=False, echo=lambda *_: None)
    part = tmp_path / "part"
    train(folder_config(image_folder, steps=4), part, progress=False, run_test=False, echo=lambda *_: None)
    train(folder_config(image_folder, steps=8), resume=part, progress=False, run_test=False, echo=lambda *_: None)
    a, b = weights(full), weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics_without_timing(full) == metrics_without_timing(part)


@pytest.mark.integration
def test_checkpoint_round_trip_and_load(image_folder, tmp_path):
    train(folder_config(image_folder, steps=2), tmp_path / "run", progress=False, run_test=False,
          echo=lambda *_: None)
    loaded = metamap.load(tmp_path / "run")                       # a run folder means its best checkpoint
    learner = loaded.learner
    saved = weights(tmp_path / "run", "best")
    assert all(torch.equal(v, saved[k]) for k, v in learner.state_dict().items())
    assert loaded.spec.size == 28 and not learner.training
    assert loaded.path == tmp_path / "run" / "best" and loaded.config["learner"]["name"] == "protonet"
    assert not hasattr(learner, "spec") and not hasattr(learner, "config")   # nothing glued onto the module
    x = torch.randn(6, 1, 28, 28)
    out = learner.adapt(x[:3], torch.tensor([0, 1, 2]))(x[3:])
    assert out.shape == (3, 3)
    assert torch.equal(loaded.adapt(x[:3], torch.tensor([0, 1, 2]))(x[3:]), out)


@pytest.mark.integration
def test_damaged_checkpoints_fail_clearly(image_folder, tmp_path):
    train(folder_config(image_folder, steps=2), tmp_path / "run", progress=False, run_test=False,
          echo=lambda *_: None)
    ckpt = tmp_path / "run" / "best"
    w = ckpt / checkpoint.WEIGHTS
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        metamap.load(ckpt)
    (ckpt / checkpoint.META).write_text("{not json")
    with pytest.raises(CheckpointError, match="damaged"):
        metamap.load(ckpt)
    with pytest.raises(CheckpointError, match="does not exist"):
        metamap.load(tmp_path / "nowhere")
    meta = json.loads((tmp_path / "run" / "last" / checkpoint.META).read_text())
    meta["version"] = 99
    (tmp_path / "run" / "last" / checkpoint.META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="newer"):
        metamap.load(tmp_path / "run" / "last")


@pytest.mark.integration
def test_architecture_mismatch_names_the_difference(image_folder, tmp_path):
    train(folder_config(image_folder, steps=1), tmp_path / "run", progress=False, run_test=False,
          echo=lambda *_: None)
    meta = json.loads((tmp_path / "run" / "best" / checkpoint.META).read_text())
    meta["config"]["model"]["hidden"] = 16
    checkpoint.write_meta(tmp_path / "run" / "best", meta)      # an intended edit, with its checksum
    with pytest.raises(CheckpointError, match="shape mismatch"):
        metamap.load(tmp_path / "run" / "best")


@pytest.mark.integration
def test_cli_train_eval_predict(image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--data", "folder", "--set", f"data.path={image_folder}", "--set", "data.fractions=[0.5,0.2,0.3]",
            "--steps", "3", "--ways", "3", "--queries", "2", "--set", "eval.ways=[3]", "--set", "eval.queries=2",
            "--episodes", "7", "--set", "train.val_every=0", "--set", "model.hidden=8", "--run-dir", str(run), "-q"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "resolved config" in out and "3-way 1-shot, 2 queries/class" in out and "(7 episodes" in out
    assert main(["eval", "--checkpoint", str(run), "--episodes", "9", "-q", "--json", str(tmp_path / "r.json")]) == 0
    assert "(9 episodes" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "r.json").read_text())[0]["scores"]) == 9
    # predict: two classes from the folder, their first images as support, the rest as queries.
    support, query = tmp_path / "support", tmp_path / "query"
    for c in ("class00", "class01"):
        (support / c).mkdir(parents=True)
        (support / c / "a.png").write_bytes((image_folder / c / "img0.png").read_bytes())
    query.mkdir()
    for c in ("class00", "class01"):
        (query / f"{c}-q.png").write_bytes((image_folder / c / "img1.png").read_bytes())
    assert main(["predict", "--checkpoint", str(run), "--support", str(support), "--query", str(query),
                 "--out", str(tmp_path / "p.csv")]) == 0
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == ["class00-q.png", "class01-q.png"]
    assert all(r["prediction"] in ("class00", "class01") and 0 < float(r["score"]) <= 1 for r in rows)


@pytest.mark.integration
def test_cli_user_errors_exit_2_without_traceback(image_folder, tmp_path, capsys):
    assert main(["train", "--set", "optim.lr=-1"]) == 2
    assert "optim.lr must be a number > 0 and <= 1e+06" in capsys.readouterr().err
    assert main(["train", "--set", "train.nonsense=1"]) == 2
    assert "unknown config key 'train.nonsense'" in capsys.readouterr().err
    assert main(["train", "--learner", "nope"]) == 2
    assert "unknown learner 'nope'" in capsys.readouterr().err
    assert main(["train", "--data", "folder", "--set", f"data.path={image_folder}", "--ways", "50", "-q",
                 "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "50-way" in err and "Traceback" not in err
    assert main(["eval", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.integration
def test_chunked_meta_batch_gives_the_same_gradient(tiny_dataset, image_folder, tmp_path):
    from metamap.algorithms.protonet import PrototypicalNetwork
    from metamap.nets import Conv4
    from metamap.tasks.sampler import EpisodeSampler
    from metamap.train.trainer import Trainer
    sampler = EpisodeSampler(tiny_dataset, 3, 1, 2, tasks_per_batch=5, seed=0)
    grads = []
    for chunk in (0, 2):
        torch.manual_seed(0)
        learner = PrototypicalNetwork(Conv4(hidden=8, image_size=8, layers=2), example_dims=3).double()
        config = folder_config(image_folder, **{"train.chunk_tasks": chunk})
        trainer = Trainer(learner, sampler, config, tmp_path / f"c{chunk}", meta={}, progress=False)
        batch = sampler.batch(0)
        batch = type(batch)(batch.support_x.double(), batch.support_y, batch.query_x.double(), batch.query_y, 3)
        loss, _ = trainer._forward_backward(batch)
        grads.append((loss, [p.grad.clone() for p in learner.parameters()]))
    (l0, g0), (l1, g1) = grads
    assert torch.allclose(l0, l1, rtol=1e-12)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14), (a - b).abs().max()


@pytest.mark.integration
def test_memory_is_logged_and_bf16_autocast_trains(image_folder, tmp_path):
    train(folder_config(image_folder, steps=3, **{"train.precision": "'bf16'"}), tmp_path / "run", progress=False,
          run_test=False, echo=lambda *_: None)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert steps and all(r["peak_rss_mb"] > 10 and r["rss_mb"] > 10 for r in steps)
    with pytest.raises(Exception, match="fp16 needs a CUDA device"):
        train(folder_config(image_folder, steps=1, **{"train.precision": "'fp16'"}), tmp_path / "r2",
              progress=False, run_test=False, echo=lambda *_: None)


def test_chunk_tasks_auto_is_the_learners_choice_and_bad_values_are_refused():
    from metamap import config as configlib
    from metamap.algorithms.gradient import GradientLearner
    from metamap.algorithms.protonet import PrototypicalNetwork
    from metamap.errors import ConfigError
    from metamap.nets import MLP, Conv4
    conv = Conv4(hidden=4, image_size=8, layers=2)
    assert GradientLearner(conv, torch.nn.Linear(conv.out_features, 3), 3, ways=3).preferred_chunk() == 8
    anil = GradientLearner(conv, torch.nn.Linear(conv.out_features, 3), 3, ways=3, adapt="head")
    assert anil.preferred_chunk() == 0                      # shared body: one large batch is best
    mlp = MLP(1, (8,))
    assert GradientLearner(mlp, torch.nn.Linear(mlp.out_features, 1), 1).preferred_chunk() == 0
    assert PrototypicalNetwork(conv, example_dims=3).preferred_chunk() == 0
    assert configlib.resolve()["train"]["chunk_tasks"] == "auto"
    for bad in ("-1", "'two'", "1.5"):
        with pytest.raises(ConfigError, match="train.chunk_tasks must be auto or a whole number"):
            configlib.resolve(overrides=[f"train.chunk_tasks={bad}"])


@pytest.mark.integration
def test_trainer_applies_reptiles_parameter_difference_with_sgd(image_folder, tmp_path):
    """One trainer step of Reptile with optim.name = sgd, in chunks of one task, is exactly
    theta + eps * (mean_t phi_t - theta), phi_t from the same inner loop run by hand."""
    from metamap.train.run import build
    from metamap.train.trainer import Trainer
    config = folder_config(image_folder, steps=1, **{"learner.name": "'reptile'", "optim.name": "'sgd'",
                                                     "optim.lr": 0.5, "schedule.name": "'constant'", "episode.shots": 1,
                                                     # plain SGD inner steps: Adam would turn the rounding
                                                     # noise of the biases batch norm cancels into +-lr steps
                                                     "learner.inner_optimizer": "'sgd'", "learner.inner_lr": 0.1,
                                                     "learner.inner_batch": 0, "learner.inner_state": "'reset'",
                                                     "train.chunk_tasks": 1, "train.val_every": 0})
    source, _, learner = build(config)
    ep = config["episode"]
    sampler = source.sampler(config, "train", ep["ways"], ep["shots"], ep["queries"], ep["tasks_per_batch"], 0)
    theta = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    batch = sampler.batch(0)
    learner.train()
    phi = learner._adapt(batch.support_x, batch.support_y, learner.inner_steps, False)[0][-1]
    trainer = Trainer(learner, sampler, config, tmp_path / "run", meta={}, progress=False)
    assert trainer.train_step() is not None
    for n, p in learner.model.named_parameters():
        torch.testing.assert_close(p.detach(), theta[n] + 0.5 * (phi[n].mean(0) - theta[n]), rtol=1e-5, atol=1e-6)
