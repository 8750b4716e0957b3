"""Issue 13, item 9 through the command line: every value that once passed ``config.resolve`` and
crashed later (or was taken silently), and a config file that is not UTF-8, make ``metamap train``
print one line naming the key and exit with status 2, before any work and without a run folder.
(``tests/test_options.py`` checks the same values through ``config.resolve`` itself.)"""
import re

import pytest

from metamap import config as configlib
from metamap.cli import main
from metamap.errors import ConfigError
from tests.test_options import CRASHED_LATER, FOLDER

# Issue 13, item 9: the values that once passed `config.resolve` and crashed later (the table of
# tests/test_options.py, which checks them at resolve), here through the CLI; a folder needs a path.
ONCE_CRASHED = {name: (overrides + (["data.path='/nowhere'"] if overrides[0] in FOLDER else []), message)
                for name, (overrides, message) in CRASHED_LATER.items()}


def refused_in_one_line(argv, message, run, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not run.exists()                     # refused before anything was written


@pytest.mark.parametrize("name", list(ONCE_CRASHED))
def test_the_cli_refuses_each_value_in_one_line_without_a_run_folder(name, capsys, tmp_path):
    overrides, message = ONCE_CRASHED[name]
    run = tmp_path / "run"
    argv = ["train", "-q", "--no-test", "--steps", "1", "--run-dir", str(run)]
    for item in overrides:
        argv += ["--set", item]
    refused_in_one_line(argv, message, run, capsys)
    assert main(argv) == 2 and ", not " in capsys.readouterr().err       # and what was given


def test_the_same_value_in_a_config_file_is_refused_naming_the_file(capsys, tmp_path):
    (tmp_path / "bad.toml").write_text("[schedule]\nwarmup = -5\n")
    with pytest.raises(ConfigError, match=r"schedule\.warmup must be .*not -5"):
        configlib.resolve(tmp_path / "bad.toml")
    run = tmp_path / "run"
    refused_in_one_line(["train", str(tmp_path / "bad.toml"), "-q", "--run-dir", str(run)],
                        "schedule.warmup must be", run, capsys)


def test_a_config_file_that_is_not_utf8_is_refused_by_the_cli(capsys, tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes("[train]\nsteps = 3 # caf\xe9\n".encode("latin-1"))
    run = tmp_path / "run"
    refused_in_one_line(["train", str(path), "-q", "--run-dir", str(run)], "latin1.toml", run, capsys)
    assert main(["train", str(path), "-q", "--run-dir", str(run)]) == 2
    assert "not UTF-8" in capsys.readouterr().err


@pytest.mark.parametrize("overrides,message", [
    (["optim.lr=1e30"], "optim.lr must be a number > 0 and <= 1e+06"),
    (["optim.weight_decay=1e30"], "optim.weight_decay must be"),
    (["learner.name='finetune'", "learner.steps=100000"], "learner.steps must be"),       # > 20 CPU-s per episode
    (["optim.name='sgd'", "optim.momentum=2"], "optim.momentum must be"),
    (["learner.name='maml'", "learner.inner_lr=99999999999999999999999"], "learner.inner_lr must be"),
    (["learner.name='finetune'", "learner.lr=1e30"], "learner.lr must be"),
    (["learner.name='finetune'", "learner.head='cosine'", "learner.scale=1e30"], "learner.scale must be"),
    (["eval.finetune_lr=1e30"], "eval.finetune_lr must be"),
    (["learner.name='maml'", "learner.inner_optimizer='adam'", "learner.inner_eps=1e23"], "learner.inner_eps must be"),
    (["schedule.name='cosine'", "schedule.min_lr=0.01"], "schedule.min_lr = 0.01 is above optim.lr = 0.001"),
    (["learner.name='maml'", "episode.tasks_per_batch=100000"],          # minutes of CPU per step, no word
     "episode.tasks_per_batch must be a whole number from 1 to 10000"),
])
def test_values_that_only_overflow_or_stall_are_refused_at_resolve(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        configlib.resolve(overrides=overrides)
    # Up to 1e6 the divergence guard stops a run that blows up (tests/test_divergence.py uses 1e6).
    assert configlib.resolve(overrides=["optim.lr=1e6"])["optim"]["lr"] == 1e6
