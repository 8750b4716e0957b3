"""benchmarks/rl_meta.py paired: differences of per-task returns on the same test tasks."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import rl_meta  # noqa: E402

MAML = {"return_0": [-10.0, -20.0, -30.0], "return_1": [-4.0, -8.0, -21.0],
        "return_2": [-3.0, -6.0, -20.0], "return_3": [-2.0, -5.0, -19.0]}
PRETRAINED = {"return_0": [-6.0, -12.0, -18.0], "return_1": [-9.0, -10.0, -30.0],
              "return_2": [-8.0, -9.0, -29.0], "return_3": [-7.0, -8.0, -28.0]}


def _tested(folder: Path, method: str, per_task: dict) -> None:
    means = {k: [sum(v) / len(v), 0.0] for k, v in per_task.items()}
    (folder / f"{method}.json").write_text(json.dumps({"eval_seed": 7, "test_episodes": 3, "test": means}))
    (folder / f"{method}-scores.json").write_text(json.dumps(
        {"method": method, "family": "fam", "tasks": 3, "eval_seed": 7, "per_task": per_task}))


@pytest.fixture
def family(tmp_path, monkeypatch):
    monkeypatch.setattr(rl_meta, "RESULTS", tmp_path)
    folder = tmp_path / "rl" / "fam"
    folder.mkdir(parents=True)
    _tested(folder, "maml-trpo", MAML)
    _tested(folder, "pretrained", PRETRAINED)
    return folder


def test_vs_step_pairs_every_step_with_one_fixed_step_of_the_other(family, capsys):
    assert rl_meta.main(["paired", "maml-trpo", "--family", "fam", "--vs", "pretrained", "--vs-step", "0"]) == 0
    out = json.loads((family / "maml-trpo-vs-pretrained-step0-paired.json").read_text())
    one = out["differences"]["maml-trpo return_1 - pretrained return_0"]
    # per task: -4 - -6 = 2, -8 - -12 = 4, -21 - -18 = -3
    assert one["mean"] == pytest.approx(1.0)
    assert one["ci95"] == pytest.approx(1.96 * math.sqrt(13.0) / math.sqrt(3))   # sample variance of 2, 4, -3: 13
    assert one["tasks_b_above_a"] == 2 and one["tasks"] == 3
    assert out["differences"]["maml-trpo return_0 - pretrained return_0"]["mean"] == pytest.approx(-8.0)


def test_vs_without_step_pairs_equal_steps(family):
    assert rl_meta.main(["paired", "maml-trpo", "--family", "fam", "--vs", "pretrained"]) == 0
    out = json.loads((family / "maml-trpo-vs-pretrained-paired.json").read_text())
    # per task after one step: -4 - -9 = 5, -8 - -10 = 2, -21 - -30 = 9
    assert out["differences"]["maml-trpo - pretrained, return_1"]["mean"] == pytest.approx(16.0 / 3)
