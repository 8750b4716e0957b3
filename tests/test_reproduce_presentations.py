"""benchmarks/reproduce.py scores MANN as its paper does: accuracy by presentation, CI over episodes."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import reproduce  # noqa: E402
from metamap.algorithms.mann import presentation_numbers  # noqa: E402


class _Sampler:
    def batch(self, i):
        return i


class _Source:
    def sampler(self, config, split, ways, shots, queries, tasks, seed):
        assert (split, ways, shots + queries, tasks, seed) == ("test", 5, 10, 50, 7)   # 5 classes x 10 instances
        return _Sampler()


class _Learner:
    """Two episodes, two classes alternating, each shown ten times; one mistake: episode 0, class 0's 2nd showing."""

    def eval(self):
        return self

    def sequence_outputs(self, batch):
        labels = torch.tensor([[0, 1] * 10, [0, 1] * 10])
        predicted = labels.clone()
        predicted[0, 2] = 1
        return F.one_hot(predicted, 2).float(), labels, presentation_numbers(labels, 2)


def test_presentations_give_per_episode_means_and_cis(monkeypatch):
    monkeypatch.setattr("metamap.registry.data_source", lambda config: _Source())
    out = reproduce.presentations(_Learner(), {}, episodes=50, seed=7)
    assert out["1"] == [100.0, 0.0]
    # 2nd presentation: 0.5 in episode 0, 1.0 in episode 1 -> 75 %; sample std 0.3536, CI 1.96 * 0.3536 / sqrt(2)
    assert out["2"] == [75.0, 49.0]
    assert list(out) == [str(k) for k in range(1, 11)] and out["10"] == [100.0, 0.0]
