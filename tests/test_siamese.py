"""Siamese networks: contrastive loss and verification head by hand, seeded balanced pairs, CLI."""
import math

import pytest
import torch
from torch import nn

from metamap.algorithms.siamese import (
    SiameseNetwork,
    balanced_pairs,
    contrastive_loss,
    euclidean,
    nearest_support_class,
)
from metamap.errors import ConfigError
from tests.learner_helpers import cli_train_eval, episode, learner


def test_contrastive_loss_by_hand():
    d = torch.tensor([0.5, 2.0, 0.3])
    same = torch.tensor([1.0, 0.0, 0.0])
    # 1/(2*3) * [0.5^2 + max(0, 1 - 2)^2 + (1 - 0.3)^2] = (0.25 + 0 + 0.49) / 6
    assert contrastive_loss(d, same, margin=1.0).item() == pytest.approx(0.74 / 6)
    assert contrastive_loss(d, same, margin=3.0).item() == pytest.approx((0.25 + 1.0 + 2.7 ** 2) / 6)


def test_euclidean_distance():
    assert euclidean(torch.tensor([0.0, 0.0]), torch.tensor([3.0, 4.0])).item() == pytest.approx(5.0)


def test_verification_head_is_weighted_l1_distance():
    net = SiameseNetwork(nn.Identity(), 1, features=2, loss="bce")
    with torch.no_grad():
        net.head.weight.copy_(torch.tensor([[1.0, -1.0]]))
        net.head.bias.fill_(0.5)
    logit = net.similarity(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0]))
    assert logit.item() == pytest.approx(1 * 1 - 1 * 2 + 0.5)            # |1-0|, |2-4|


def test_nearest_support_class_takes_the_best_example_per_class():
    scores = torch.tensor([[[0.1, 0.9, 0.3, 0.2]]])
    labels = torch.tensor([[0, 1, 0, 1]])
    assert torch.equal(nearest_support_class(scores, labels, 2), torch.tensor([[[0.3, 0.9]]]))


def test_query_takes_the_class_of_the_nearest_support_example():
    net = SiameseNetwork(nn.Identity(), 1, features=2)
    support = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    scores = net.adapt(support, torch.tensor([0, 1, 1]))(torch.tensor([[1.0, 1.0], [0.0, 8.0]]))
    assert scores.argmax(-1).tolist() == [0, 1]
    assert scores[1].tolist() == pytest.approx([-8.0, -2.0])


def test_pairs_are_balanced_valid_and_seeded():
    labels = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 2, 0, 1, 2]])
    first, second, same = balanced_pairs(labels, 40, torch.Generator().manual_seed(1))
    assert first.shape == second.shape == same.shape == (2, 40)
    assert same.sum(1).tolist() == [20.0, 20.0]
    truth = (labels.gather(1, first) == labels.gather(1, second)).float()
    assert torch.equal(truth, same) and bool((first != second).all())
    again = balanced_pairs(labels, 40, torch.Generator().manual_seed(1))
    other = balanced_pairs(labels, 40, torch.Generator().manual_seed(2))
    assert all(torch.equal(a, b) for a, b in zip((first, second, same), again, strict=True))
    assert not torch.equal(first, other[0])


def test_meta_loss_is_the_contrastive_loss_of_the_drawn_pairs():
    net = SiameseNetwork(nn.Identity(), 1, features=4, pairs=8, margin=2.0, seed=5)
    tasks = episode(shape=(4,))
    loss, _ = net.meta_loss(tasks)
    from metamap.algorithms.seeding import content_generator
    z = torch.cat([tasks.support_x, tasks.query_x], 1)
    labels = torch.cat([tasks.support_y, tasks.query_y], 1)
    first, second, same = balanced_pairs(labels, 8, content_generator(5, tasks.support_x))
    d = torch.stack([euclidean(z[t, first[t]], z[t, second[t]]) for t in range(2)])
    by_hand = (same * d ** 2 + (1 - same) * (2.0 - d).clamp_min(0) ** 2).sum() / (2 * 16)
    assert loss.item() == pytest.approx(by_hand.item())
    # Same seed + same episode -> same pairs -> same loss, and it does not touch the global RNG.
    state = torch.get_rng_state()
    assert net.meta_loss(tasks)[0].item() == loss.item()
    assert torch.equal(state, torch.get_rng_state())
    assert SiameseNetwork(nn.Identity(), 1, features=4, pairs=8, margin=2.0, seed=6).meta_loss(tasks)[0] != loss


def test_normalized_contrastive_loss_uses_unit_embeddings():
    net = SiameseNetwork(nn.Identity(), 1, features=4, pairs=8, margin=0.5, seed=5, normalize=True)
    tasks = episode(shape=(4,))
    loss, _ = net.meta_loss(tasks)
    from metamap.algorithms.seeding import content_generator
    z = torch.cat([tasks.support_x, tasks.query_x], 1)
    z = z / z.norm(dim=-1, keepdim=True)
    labels = torch.cat([tasks.support_y, tasks.query_y], 1)
    first, second, same = balanced_pairs(labels, 8, content_generator(5, tasks.support_x))
    d = torch.stack([euclidean(z[t, first[t]], z[t, second[t]]) for t in range(2)])
    assert float(d.max()) <= 2.0                                   # distances of unit vectors
    by_hand = (same * d ** 2 + (1 - same) * (0.5 - d).clamp_min(0) ** 2).sum() / (2 * 16)
    assert loss.item() == pytest.approx(by_hand.item())
    # The prediction ranks by the same normalised distance: scaling a query changes nothing.
    support, query = tasks.support_x[:1], tasks.query_x[:1]
    a = net.adapt(support, tasks.support_y[:1])(query)
    b = net.adapt(support, tasks.support_y[:1])(7.0 * query)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("loss", ["contrastive", "bce"])
def test_deterministic_under_a_seed(loss):
    a, b = learner("siamese", f'learner.loss="{loss}"', seed=2), learner("siamese", f'learner.loss="{loss}"', seed=2)
    la, lb = a.meta_loss(episode())[0], b.meta_loss(episode())[0]
    assert torch.equal(la, lb) and math.isfinite(la.item())
    la.backward()


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="loss"):
        learner("siamese", 'learner.loss="triplet"')
    with pytest.raises(ConfigError, match="even"):
        learner("siamese", "learner.pairs=7")
    with pytest.raises(ConfigError, match="normalize"):
        learner("siamese", 'learner.normalize="yes"')
    with pytest.raises(ConfigError, match="margin"):
        learner("siamese", "learner.margin=0")


@pytest.mark.integration
def test_cli_train_eval_and_checkpoint_round_trip(tmp_path):
    _, loaded = cli_train_eval(tmp_path, "siamese", 'learner.loss="bce"', "learner.pairs=16")
    assert isinstance(loaded, SiameseNetwork) and loaded.head is not None and loaded.pairs == 16
