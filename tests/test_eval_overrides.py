"""`metamap eval --set learner.*`: adaptation overrides take effect, architectural ones are refused."""
from __future__ import annotations

import pytest

from metamap.cli import main
from metamap.errors import ConfigError
from metamap.train import eval_overrides
from metamap.train.run import evaluate_checkpoint
from tests.learner_helpers import image_folder


@pytest.fixture(scope="module")
def maml_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval-overrides")
    data = image_folder(tmp / "images")
    run = tmp / "run"
    flags = ["--learner", "maml", "--set", 'data.name="folder"', "--set", f'data.path="{data}"',
             "--set", "data.image_size=16", "--set", "model.hidden=8", "--ways", "3", "--shots", "1",
             "--queries", "2", "--steps", "2", "--episodes", "3", "--set", "eval.ways=[3]",
             "--set", "eval.queries=2", "--set", "train.val_every=0", "--set", "learner.inner_steps_eval=3",
             "--set", "train.precision=fp32", "--set", "learner.cpp_kernels=false", "--quiet", "--run-dir", str(run)]
    assert main(["train", *flags]) == 0
    return run


@pytest.mark.integration
def test_adaptation_overrides_take_effect(maml_run):
    lines = []
    common = ["eval.episodes=20", "train.precision=fp32"]
    base = evaluate_checkpoint(maml_run, common, progress=False, echo=lines.append)
    none = evaluate_checkpoint(maml_run, [*common, "learner.inner_steps_eval=0"], progress=False,
                               echo=lines.append)
    assert any("learner.inner_steps_eval = 0 (trained with 3)" in line for line in lines)
    # No inner step leaves the untrained head's guesses: the scores must differ from 3 steps'.
    assert [r.scores for r in none] != [r.scores for r in base]
    again = evaluate_checkpoint(maml_run, [*common, "learner.inner_steps_eval=3"], progress=False,
                                echo=lambda *a: None)
    assert [r.scores for r in again] == [r.scores for r in base]
    bn = evaluate_checkpoint(maml_run, [*common, 'learner.bn="running"'], progress=False, echo=lambda *a: None)
    assert [r.scores for r in bn] != [r.scores for r in base]


@pytest.mark.parametrize("override, names", [("model.hidden=16", "model.hidden"),
                                             ('learner.step_sizes="per_element"', "learner.step_sizes"),
                                             ("learner.first_order=true", "learner.first_order")])
@pytest.mark.integration
def test_architectural_overrides_are_refused(maml_run, override, names, capsys):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        evaluate_checkpoint(maml_run, [override], progress=False, echo=lambda *a: None)
    assert main(["eval", "--checkpoint", str(maml_run), "--set", override, "--quiet"]) == 2
    assert names in capsys.readouterr().err


def test_check_lists_only_changed_adaptation_keys():
    trained = {"model": {"hidden": 8}, "learner": {"inner_steps_eval": 3, "inner_steps": 1, "cpp_kernels": True}}
    now = {"model": {"hidden": 8}, "learner": {"inner_steps_eval": 10, "inner_steps": 1, "cpp_kernels": False}}
    assert eval_overrides.check(trained, now) == {"cpp_kernels": (True, False), "inner_steps_eval": (3, 10)}
    with pytest.raises(ConfigError, match="learner.inner_steps"):
        eval_overrides.check(trained, {**now, "learner": {**now["learner"], "inner_steps": 2}})
