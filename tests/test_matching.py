"""Matching Networks: cosine attention by hand, FCE, determinism, checkpoints, CLI."""
import math

import pytest
import torch
from torch import nn

from metamap.algorithms.matching import FullContextEmbedding, MatchingNetwork, class_log_attention, cosine_similarities
from tests.learner_helpers import cli_train_eval, episode, learner


def test_cosine_similarities_by_hand():
    q = torch.tensor([[[1.0, 0.0]]])
    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])
    assert torch.allclose(cosine_similarities(q, s), torch.tensor([[[1.0, 0.0, 1 / math.sqrt(2)]]]))


def test_attention_mass_per_class_by_hand():
    scores = torch.tensor([[[1.0, 0.0, 0.5]]])
    labels = torch.tensor([[0, 1, 0]])
    total = math.e + 1 + math.exp(0.5)
    expected = torch.tensor([[[(math.e + math.exp(0.5)) / total, 1 / total]]])
    assert torch.allclose(class_log_attention(scores, labels, 2).exp(), expected)


def test_predictor_gives_the_attention_distribution():
    # Identity encoder on 2-d vectors: attention = softmax of cosine similarities.
    net = MatchingNetwork(nn.Identity(), example_dims=1)
    support = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    probs = net.adapt(support, torch.tensor([0, 1]))(torch.tensor([[2.0, 2.0], [5.0, 0.0]])).exp()
    assert torch.allclose(probs[0], torch.tensor([0.5, 0.5]))        # cos = 1/sqrt(2) to both
    assert torch.allclose(probs[1], torch.tensor([math.e, 1.0]) / (math.e + 1))   # cos = 1 and 0


def test_meta_loss_is_negative_log_attention_on_the_true_class():
    net = MatchingNetwork(nn.Identity(), example_dims=1)
    from metamap.tasks.batch import TaskBatch
    tasks = TaskBatch(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), torch.tensor([[0, 1]]),
                      torch.tensor([[[1.0, 0.0]]]), torch.tensor([[0]]), ways=2)
    loss, metrics = net.meta_loss(tasks)
    assert loss.item() == pytest.approx(-math.log(math.e / (math.e + 1)), rel=1e-6)
    assert metrics["accuracy"] == 1.0


def test_scale_sharpens_the_attention():
    net = MatchingNetwork(nn.Identity(), example_dims=1, scale=3.0)
    probs = net.adapt(torch.tensor([[1.0, 0.0], [0.0, 3.0]]), torch.tensor([0, 1]))(torch.tensor([[5.0, 0.0]])).exp()
    assert torch.allclose(probs, torch.tensor([[math.exp(3), 1.0]]) / (math.exp(3) + 1))   # cosines 1, 0


def test_fce_with_zero_weights_is_the_identity():
    # All-zero LSTMs output h = 0 (c stays 0), so g = g' and each step returns h = f'.
    fce = FullContextEmbedding(4, steps=3)
    for p in fce.parameters():
        nn.init.zeros_(p)
    g, f = torch.randn(2, 5, 4), torch.randn(2, 3, 4)
    assert torch.equal(fce.support(g), g)
    assert torch.allclose(fce.query(f, g), f)


def test_fce_learner_shapes_and_gradients():
    net = learner("matching", "learner.fce=true", "learner.fce_steps=2")
    loss, _ = net.meta_loss(episode())
    loss.backward()
    assert net.fce.query_cell.weight_ih.grad.abs().sum() > 0
    net.eval()
    tasks = episode()
    assert net.adapt(tasks.support_x, tasks.support_y, 3)(tasks.query_x).shape == (2, 6, 3)


def test_deterministic_under_a_seed():
    a, b = learner("matching", seed=3), learner("matching", seed=3)
    assert torch.equal(a.meta_loss(episode())[0], b.meta_loss(episode())[0])


@pytest.mark.integration
def test_cli_train_eval_and_checkpoint_round_trip(tmp_path):
    run, loaded = cli_train_eval(tmp_path, "matching", "learner.fce=true")
    assert isinstance(loaded, MatchingNetwork) and loaded.fce is not None
    tasks = episode(ways=3)
    out = loaded.adapt(tasks.support_x, tasks.support_y)(tasks.query_x)
    again = __import__("metamap").load(run).adapt(tasks.support_x, tasks.support_y)(tasks.query_x)
    assert torch.equal(out, again)
