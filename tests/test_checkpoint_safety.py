"""Checkpoints and run folders under kills, edits and misuse: what is refused, what is recovered."""
import json
import re
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import metamap
from metamap.cli import main
from metamap.errors import CheckpointError
from metamap.metrics_log import read_records
from metamap.train import checkpoint
from metamap.train.run import train
from tests import kill_points
from tests.test_training import folder_config, metrics_without_timing, weights

QUIET = {"progress": False, "echo": lambda *_: None}
SWEEP = {"train.checkpoint_every": 2, "train.val_every": 0, "train.report": "false", "train.threads": 1}


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    monkeypatch.setattr("metamap.train.run.plot_curves", lambda run_dir: None)   # not what these tests are about


def staging(run):
    return sorted(p.name for p in run.iterdir() if p.name.startswith((".last.", ".best.")))


@pytest.fixture(scope="module")
def whole_run(image_folder, tmp_path_factory):
    """A 6-batch run that nothing interrupted: what every interrupted one must equal."""
    run = tmp_path_factory.mktemp("whole") / "run"
    train(folder_config(image_folder, steps=6, **SWEEP), run, run_test=False, **QUIET)
    return run


@pytest.mark.integration
@pytest.mark.parametrize("point", kill_points.POINTS, ids=lambda p: kill_points.describe(*p).replace(" ", "-"))
def test_a_kill_anywhere_in_a_checkpoint_write_resumes_bit_identical(point, whole_run, image_folder, tmp_path):
    run = tmp_path / "run"
    config = folder_config(image_folder, steps=6, **SWEEP)
    with kill_points.inject(*point, name="last", step=4), pytest.raises(kill_points.Killed):
        train(config, run, run_test=False, **QUIET)
    # The checkpoint to resume from is found whatever the point: in last/ or in a staging folder.
    step = checkpoint.read_meta(checkpoint.resume_source(run))[1]["step"]
    assert step in (2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")         # nothing to warn about: no torn log line here
        train(config, resume=run, run_test=False, **QUIET)
    a, b = weights(whole_run), weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics_without_timing(whole_run) == metrics_without_timing(run)
    assert staging(run) == []                  # leftovers of the killed write are gone


@pytest.mark.integration
def test_between_the_renames_the_checkpoint_is_found_read_only_and_put_back_on_resume(image_folder, tmp_path):
    run = tmp_path / "run"
    config = folder_config(image_folder, steps=4, **SWEEP)
    rename_new = kill_points.STEPS.index("_rename new") + 1
    with kill_points.inject(rename_new, False, name="last", step=4), pytest.raises(kill_points.Killed):
        train(config, run, run_test=False, **QUIET)
    assert not (run / "last").exists() and len(staging(run)) == 2      # .last.old-PID and .last.tmp-PID
    # load and eval read it where it is (and change nothing); the new state (step 4) wins over the old (2)
    assert checkpoint.read_meta(run / "last")[1]["step"] == 4
    assert main(["eval", "--checkpoint", str(run / "last"), "--episodes", "3", "-q"]) == 0
    assert len(staging(run)) == 2
    assert main(["train", "--resume", str(run), "--no-test", "-q"]) == 0
    assert staging(run) == [] and checkpoint.read_meta(run / "last")[1]["step"] == 4


@pytest.mark.integration
def test_a_kill_while_best_is_replaced_is_recovered_too(image_folder, tmp_path):
    run = tmp_path / "run"
    config = folder_config(image_folder, steps=4, **{**SWEEP, "train.val_every": 2})
    train(config, run, run_test=False, **QUIET)
    best_step = checkpoint.read_meta(run / "best")[1]["step"]
    (run / "best").rename(run / f".best.old-{99999}")       # as a kill between the renames leaves it
    assert checkpoint.read_meta(run)[1]["step"] == best_step    # a run folder still means its best
    train(folder_config(image_folder, steps=6, **{**SWEEP, "train.val_every": 2}), resume=run, run_test=False,
          **QUIET)
    assert (run / "best" / checkpoint.META).is_file() and staging(run) == []


@pytest.mark.integration
def test_a_run_killed_before_its_first_checkpoint_is_never_silently_reused(image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    config = folder_config(image_folder, steps=4, **SWEEP)
    with kill_points.inject(1, False, name="last", step=2), pytest.raises(kill_points.Killed):
        train(config, run, run_test=False, **QUIET)
    assert not (run / "last").exists() and (run / "metrics.jsonl").exists()
    args = ["train", "--data", "folder", "--set", f"data.path={image_folder}", "--steps", "2", "-q", "--no-test",
            "--run-dir", str(run)]
    log = (run / "metrics.jsonl").read_text()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "choose another --run-dir" in err and "Traceback" not in err
    assert (run / "metrics.jsonl").read_text() == log                    # nothing appended
    assert main(["train", "--resume", str(run), "-q"]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    # The first write of last/ cut half-way (best/ written just before): resumed from best/, the
    # incomplete staging folder never taken and removed.
    torn = tmp_path / "torn"
    with_val = folder_config(image_folder, steps=4, **{**SWEEP, "train.val_every": 2})
    with kill_points.inject(2, True, name="last", step=2), pytest.raises(kill_points.Killed):
        train(with_val, torn, run_test=False, **QUIET)
    assert staging(torn) and checkpoint.locate(torn / "last") is None and (torn / "best").is_dir()
    train(with_val, resume=torn, run_test=False, **QUIET)
    assert staging(torn) == [] and checkpoint.read_meta(torn / "last")[1]["step"] == 4
    # An empty folder is fine; so is a new one.
    (tmp_path / "empty").mkdir()
    train(config, tmp_path / "empty", run_test=False, **QUIET)


@pytest.mark.integration
def test_a_second_process_cannot_write_a_run_folder_in_use(image_folder, tmp_path):
    from metamap.train.run import hold_run_dir
    run = tmp_path / "run"
    train(folder_config(image_folder, steps=2, **SWEEP), run, run_test=False, **QUIET)
    with hold_run_dir(run), pytest.raises(CheckpointError, match="in use by another metamap process"):
        train(folder_config(image_folder, steps=4, **SWEEP), resume=run, run_test=False, **QUIET)


@pytest.mark.integration
def test_a_torn_last_line_of_the_log_is_left_out_on_resume(image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    train(folder_config(image_folder, steps=2, **SWEEP), run, run_test=False, **QUIET)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 41, "loss": 1.23, "accu')                      # a kill in mid-write
    with pytest.warns(UserWarning, match="left out its last line"):
        train(folder_config(image_folder, steps=4, **SWEEP), resume=run, run_test=False, **QUIET)
    steps = [r["step"] for r in read_records(run / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]
    # A damaged line that is not the last one is not a kill: refused by its number.
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "[1, 2]", *lines[1:]]) + "\n")
    assert main(["train", "--resume", str(run), "--steps", "6", "-q", "--no-test"]) == 2
    assert "metrics.jsonl, line 2, is damaged" in capsys.readouterr().err


# -- checkpoint.json ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_run(image_folder, tmp_path_factory):
    run = tmp_path_factory.mktemp("saved") / "run"
    train(folder_config(image_folder, steps=2, **SWEEP), run, run_test=False, **QUIET)
    return run


@pytest.fixture
def run_copy(saved_run, tmp_path):
    shutil.copytree(saved_run, tmp_path / "run")
    return tmp_path / "run"


def edit_meta(folder, edit, sign=True):
    meta = json.loads((folder / checkpoint.META).read_text())
    edit(meta)
    if sign:
        checkpoint.write_meta(folder, meta)
    else:
        (folder / checkpoint.META).write_text(json.dumps(meta, indent=2))


def predict_args(run, image_folder, tmp_path):
    support, query = tmp_path / "support", tmp_path / "query"
    for c in ("class00", "class01"):
        (support / c).mkdir(parents=True, exist_ok=True)
        shutil.copy(image_folder / c / "img0.png", support / c / "a.png")
    query.mkdir(exist_ok=True)
    shutil.copy(image_folder / "class00" / "img1.png", query / "q.png")
    return ["predict", "--checkpoint", str(run), "--support", str(support), "--query", str(query)]


def every_use_refuses(run, image_folder, tmp_path, capsys, match):
    """load, eval, predict and resume all refuse the checkpoint with exit status 2 and ``match``."""
    with pytest.raises(CheckpointError, match=match):
        metamap.load(run / "last")
    for args in (["eval", "--checkpoint", str(run / "last"), "--episodes", "2", "-q"],
                 predict_args(run / "last", image_folder, tmp_path),
                 ["train", "--resume", str(run), "--steps", "3", "-q", "--no-test"]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert re.search(match, err), (args, err)


@pytest.mark.integration
def test_one_changed_digit_in_checkpoint_json_is_refused(run_copy, image_folder, tmp_path, capsys):
    def std(meta):
        spec = meta["data_info"]["spec"]
        spec["std"] = [spec["std"][0] + 1e-6]
    edit_meta(run_copy / "last", std, sign=False)
    (run_copy / "best").rename(run_copy / "spare")
    every_use_refuses(run_copy, image_folder, tmp_path, capsys, "does not match its own checksum")


@pytest.mark.integration
def test_deleting_the_checksums_and_flipping_a_weight_byte_is_refused(run_copy, image_folder, tmp_path, capsys):
    edit_meta(run_copy / "last", lambda m: m.pop("sha256"), sign=False)
    w = run_copy / "last" / checkpoint.WEIGHTS
    blob = bytearray(w.read_bytes())
    blob[-3] ^= 0x40
    w.write_bytes(bytes(blob))
    (run_copy / "best").rename(run_copy / "spare")
    every_use_refuses(run_copy, image_folder, tmp_path, capsys, "own checksum")
    edit_meta(run_copy / "last", lambda m: m.pop("sha256", None), sign=True)        # even when re-signed
    every_use_refuses(run_copy, image_folder, tmp_path, capsys, "sha256 must map")


@pytest.mark.integration
def test_nan_weights_with_matching_checksums_are_refused(run_copy, image_folder, tmp_path, capsys):
    last = run_copy / "last"
    w = load_file(last / checkpoint.WEIGHTS)
    name = next(k for k, v in w.items() if v.is_floating_point())
    w[name] = w[name].clone()
    w[name].view(-1)[0] = float("nan")
    save_file(w, last / checkpoint.WEIGHTS)
    digest = checkpoint.sha256_file(last / checkpoint.WEIGHTS)
    edit_meta(last, lambda m: m["sha256"].update({checkpoint.WEIGHTS: digest}))
    (run_copy / "best").rename(run_copy / "spare")
    every_use_refuses(run_copy, image_folder, tmp_path, capsys, f"NaN or infinite values in {name}")


def _set(path, value):
    def edit(meta):
        *parents, key = path.split(".")
        d = meta
        for p in parents:
            d = d[p]
        if value is KeyError:
            del d[key]
        else:
            d[key] = value
    return edit


# Each edit, re-signed (as a tool or a bug would write it): still a clean error naming the field.
MALFORMED = [("data_info", KeyError, "data_info is missing"), ("config", KeyError, "config is missing"),
             ("sha256", [], "sha256 must map"), ("step", "30", "step must be a whole number"),
             ("step", -1, "step must be a whole number"), ("data_info.colour", 1, "unknown key"),
             ("data_info.spec.channels", 2, "data_info.spec is invalid"),
             ("data_info.example_shape", "abc", "example_shape must be a list"),
             ("data_info.example_shape", [3, 28, 28], "describes images of shape"),
             ("data_info.spec.std", [0.0], "data_info.spec is invalid"),
             ("data_info.spec.mean", ["x"], "lists of finite numbers"),
             ("data_info.spec", "28", "data_info.spec must be a table"),
             ("config.learner", KeyError, "config.learner is missing"),
             ("learner", "matching", "must be the name in config.learner.name"),
             ("bad_steps", 1.5, "bad_steps must be"), ("best", [1], "best must be a table"),
             ("optimizer", 3, "optimizer must be a table"), ("version", "1", "version must be a whole number"),
             ("version", True, "version must be a whole number"), ("format", "x", "not a metamap checkpoint"),
             ("config.model.hidden", "abc", "cannot rebuild its learner")]


@pytest.mark.parametrize("field,value,match", MALFORMED, ids=[f"{f}={v!r}" for f, v, _ in MALFORMED])
def test_malformed_checkpoint_fields_give_clean_errors(run_copy, field, value, match):
    edit_meta(run_copy / "best", _set(field, value))
    with pytest.raises(CheckpointError, match=match):
        metamap.load(run_copy / "best")


def test_version_as_text_is_not_called_newer(run_copy):
    edit_meta(run_copy / "best", _set("version", "1"), sign=False)
    with pytest.raises(CheckpointError, match=r"version must be a whole number, not '1'") as e:
        metamap.load(run_copy / "best")
    assert "newer" not in str(e.value)


@pytest.mark.integration
def test_malformed_optimizer_state_is_refused_on_resume(run_copy, capsys):
    edit_meta(run_copy / "last", lambda m: m["optimizer"].update(scalars={"x": 1}))
    shutil.rmtree(run_copy / "best")
    assert main(["train", "--resume", str(run_copy), "--steps", "3", "-q", "--no-test"]) == 2
    assert "optimizer state in checkpoint.json is malformed" in capsys.readouterr().err


def test_lowering_the_version_does_not_skip_the_checksum(run_copy, capsys):
    def downgrade(meta):
        meta["version"] = 1
        meta["data_info"]["spec"]["std"][0] *= 1.001
    edit_meta(run_copy / "best", downgrade, sign=False)
    with pytest.raises(CheckpointError, match="does not match its own checksum"):
        metamap.load(run_copy / "best")


def test_optimizer_state_moved_to_another_parameter_is_refused_on_resume(run_copy, capsys):
    def swap(meta):
        ids = meta["optimizer"]["param_groups"][0]["params"]
        ids[0], ids[-1] = ids[-1], ids[0]             # the first weight's moments onto the last bias
    edit_meta(run_copy / "last", swap)
    shutil.rmtree(run_copy / "best")
    assert main(["train", "--resume", str(run_copy), "--steps", "3", "-q", "--no-test"]) == 2
    err = capsys.readouterr().err
    assert "optimizer state does not fit this model" in err and "Traceback" not in err
    edit_meta(run_copy / "last", lambda m: m["optimizer"]["param_groups"][0]["params"].__setitem__(1, 0))
    assert main(["train", "--resume", str(run_copy), "--steps", "3", "-q", "--no-test"]) == 2
    assert "distinct ones" in capsys.readouterr().err


def test_a_format_1_checkpoint_still_loads_with_a_warning(run_copy):
    def to_v1(meta):
        meta["version"] = 1
        meta.pop(checkpoint.SELF_SUM)
    edit_meta(run_copy / "best", to_v1, sign=False)
    with pytest.warns(UserWarning, match="older metamap"):
        learner = metamap.load(run_copy / "best")
    assert learner.info.example_shape == (1, 28, 28)


# -- another learner ---------------------------------------------------------------------------
@pytest.mark.integration
def test_resuming_or_evaluating_as_another_learner_is_refused(run_copy, capsys):
    config_before = (run_copy / "config.toml").read_text()
    for extra in (["--steps", "4"], []):
        assert main(["train", "--resume", str(run_copy), "--learner", "matching", "-q", "--no-test", *extra]) == 2
        err = capsys.readouterr().err
        assert "learner.name = 'protonet'; it cannot be resumed with learner.name = 'matching'" in err
    assert (run_copy / "config.toml").read_text() == config_before
    assert main(["train", "--resume", str(run_copy), "--set", "optim.name='sgd'", "-q", "--no-test"]) == 2
    assert "optim.name = 'adam'" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run_copy), "--set", "learner.name='matching'", "-q"]) == 2
    assert "eval cannot make it a 'matching' one" in capsys.readouterr().err


@pytest.mark.integration
def test_resumed_optimizer_uses_the_configs_hyper_parameters(run_copy, image_folder):
    from metamap.train.run import build
    from metamap.train.trainer import Trainer
    config = folder_config(image_folder, steps=4, **{**SWEEP, "optim.weight_decay": 0.25})
    source, _, learner = build(config)
    sampler = source.sampler(config, "train", 3, 1, 2, 2, 0)
    trainer = Trainer(learner, sampler, config, run_copy, meta={"learner": "protonet"}, progress=False)
    trainer.resume(run_copy / "last")
    assert trainer.step == 2 and all(g["weight_decay"] == 0.25 for g in trainer.optimizer.param_groups)
    assert all(len(s) for s in trainer.optimizer.state.values())          # the moments came back
