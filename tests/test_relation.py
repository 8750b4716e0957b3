"""Relation Networks: pairing and relation scores by hand, the MSE objective, shapes, CLI."""
import pytest
import torch
from torch import nn

from metamap.algorithms.relation import RelationModule, RelationNetwork, class_sums, relation_encoder
from metamap.errors import ConfigError
from metamap.tasks.batch import TaskBatch
from tests.learner_helpers import cli_train_eval, episode, learner


class ProductRelation(nn.Module):
    """A stand-in relation module: score = (class map sum) * (query map sum) / 100."""

    def forward(self, classes, queries):
        return queries.sum((2, 3, 4)).unsqueeze(2) * classes.sum((2, 3, 4)).unsqueeze(1) / 100


def maps(*values):
    """One 1x1x1 feature map per value: ``[1, n, 1, 1, 1]``."""
    return torch.tensor(values).view(1, -1, 1, 1, 1)


def test_class_sums_add_the_shots_of_each_class():
    sums = class_sums(maps(1.0, 2.0, 10.0, 20.0), torch.tensor([[0, 0, 1, 1]]), 2)
    assert sums.flatten().tolist() == [3.0, 30.0]


def test_scores_pair_every_query_with_every_class():
    net = RelationNetwork(nn.Identity(), ProductRelation(), example_dims=3)
    scores = net.adapt(maps(1.0, 2.0, 3.0)[0], torch.tensor([0, 0, 1]))(maps(1.0, 4.0)[0])
    # class 0 sums 1 + 2 = 3, class 1 is 3; score = class * query / 100, rows are queries
    assert torch.allclose(scores, torch.tensor([[0.03, 0.03], [0.12, 0.12]]))
    scores = net.adapt(maps(1.0, 5.0)[0], torch.tensor([0, 1]))(maps(2.0, 3.0)[0])
    assert torch.allclose(scores, torch.tensor([[0.02, 0.10], [0.03, 0.15]]))


def test_meta_loss_is_mse_against_the_one_hot_match():
    net = RelationNetwork(nn.Identity(), ProductRelation(), example_dims=3)
    tasks = TaskBatch(maps(10.0, 50.0), torch.tensor([[0, 1]]), maps(2.0), torch.tensor([[1]]), ways=2)
    loss, metrics = net.meta_loss(tasks)
    # scores [0.2, 1.0] against one-hot [0, 1]
    assert loss.item() == pytest.approx((0.2 ** 2 + 0.0) / 2)
    assert metrics["accuracy"] == 1.0


def test_paper_modules_shapes_and_score_range():
    encoder = relation_encoder(1, 8)
    assert encoder(torch.zeros(2, 1, 28, 28)).shape == (2, 8, 7, 7)
    assert relation_encoder(3, 8)(torch.zeros(1, 3, 84, 84)).shape == (1, 8, 21, 21)
    module = RelationModule(8, side=7, hidden=4)
    scores = module.score_pairs(torch.randn(5, 16, 7, 7))
    assert scores.shape == (5,) and bool(((scores > 0) & (scores < 1)).all())


def test_split_first_convolution_equals_scoring_every_concatenated_pair():
    module = RelationModule(4, side=8, hidden=3).eval()
    with torch.no_grad():                                  # non-trivial BatchNorm statistics
        for bn in (module.convs[0][1], module.convs[1][1]):
            bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
    classes, queries = torch.randn(2, 3, 4, 8, 8), torch.randn(2, 5, 4, 8, 8)
    pairs = torch.cat([classes.unsqueeze(1).expand(-1, 5, -1, -1, -1, -1),
                       queries.unsqueeze(2).expand(-1, -1, 3, -1, -1, -1)], dim=3)
    assert torch.allclose(module(classes, queries), module.score_pairs(pairs.flatten(0, 2)).view(2, 5, 3),
                          atol=1e-6)


def test_learner_trains_and_predicts():
    net = learner("relation")
    loss, _ = net.meta_loss(episode())
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    net.eval()
    tasks = episode()
    assert net.adapt(tasks.support_x, tasks.support_y)(tasks.query_x).shape == (2, 6, 3)


def test_deterministic_under_a_seed():
    a, b = learner("relation", seed=4), learner("relation", seed=4)
    assert torch.equal(a.meta_loss(episode())[0], b.meta_loss(episode())[0])


def test_needs_conv_feature_maps():
    with pytest.raises(ConfigError, match="conv4"):
        learner("relation", shape=(5,))


@pytest.mark.integration
def test_cli_train_eval_and_checkpoint_round_trip(tmp_path):
    _, loaded = cli_train_eval(tmp_path, "relation")
    assert isinstance(loaded, RelationNetwork)


def test_batch_norm_statistics_are_per_task_in_training():
    """A task's loss does not depend on the other tasks of its meta-batch (encoder and relation
    module both normalise each task's examples and pairs on their own)."""
    net = learner("relation")
    net.train()
    tasks = episode(tasks=3)
    whole, _ = net.meta_loss(tasks)
    alone = [net.meta_loss(tasks.task(i))[0] for i in range(3)]
    torch.testing.assert_close(whole, torch.stack(alone).mean(), rtol=1e-6, atol=1e-7)


def test_the_encoder_comes_from_the_backbone_registry_and_old_checkpoints_load():
    from metamap.nets.backbones import Conv4
    net = learner("relation")
    assert isinstance(net.encoder, Conv4) and net.encoder.feature_maps and net.encoder.out_shape == (8, 4, 4)
    with pytest.raises(ConfigError, match="feature_maps"):
        learner("relation", "model.feature_maps=false")
    # Checkpoints from before kept the encoder as a bare Sequential of conv blocks.
    old = {k.replace("encoder.features.", "encoder.", 1): v for k, v in net.state_dict().items()}
    assert net.upgrade_state(old).keys() == net.state_dict().keys()
