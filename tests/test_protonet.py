import pytest
import torch
from torch import nn

from metamap.algorithms.protonet import PrototypicalNetwork, class_means, squared_distances
from metamap.errors import MetamapError
from metamap.tasks.batch import TaskBatch


def identity_protonet():
    return PrototypicalNetwork(nn.Flatten(), example_dims=1)


def test_prototypes_distances_and_loss_by_hand():
    # Two classes in 2-D: support {(0,0),(2,0)} -> prototype (1,0); {(0,4)} -> (0,4).
    sx = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]]], dtype=torch.float64)
    sy = torch.tensor([[0, 0, 1]])
    protos = class_means(sx, sy, 2)
    assert protos.tolist() == [[[1.0, 0.0], [0.0, 4.0]]]
    q = torch.tensor([[[1.0, 1.0]]], dtype=torch.float64)
    d = squared_distances(q, protos)
    assert d.tolist() == [[[1.0, 10.0]]]           # (0^2 + 1^2), (1^2 + 3^2)
    learner = identity_protonet()
    tasks = TaskBatch(sx, sy, q, torch.tensor([[0]]), ways=2)
    loss, metrics = learner.meta_loss(tasks)
    # cross-entropy of logits (-1, -10) for class 0 = log(1 + e^-9)
    expected = torch.log1p(torch.exp(torch.tensor(-9.0, dtype=torch.float64)))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert metrics == {"accuracy": 1.0}


def test_adapt_single_task_equals_batched():
    torch.manual_seed(0)
    sx, qx = torch.randn(2, 6, 3), torch.randn(2, 4, 3)
    sy = torch.tensor([[0, 0, 1, 1, 2, 2]] * 2)
    learner = identity_protonet()
    batched = learner.adapt(sx, sy)(qx)
    single = learner.adapt(sx[1], sy[1])(qx[1])
    assert batched.shape == (2, 4, 3) and torch.allclose(batched[1], single)


def test_adapt_errors_are_clear():
    learner = identity_protonet()
    with pytest.raises(MetamapError, match="one label per example"):
        learner.adapt(torch.zeros(4, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(MetamapError, match="every class"):
        learner.adapt(torch.zeros(3, 2), torch.tensor([0, 0, 2]))
    with pytest.raises(MetamapError, match="NaN"):
        learner.adapt(torch.full((2, 2), float("nan")), torch.tensor([0, 1]))
    predictor = learner.adapt(torch.zeros(2, 2), torch.tensor([0, 1]))
    with pytest.raises(MetamapError, match="expected"):
        predictor(torch.zeros(2, 2, 2))


def test_trains_on_a_toy_problem(tiny_dataset):
    from metamap.nets import Conv4
    from metamap.tasks.sampler import EpisodeSampler
    torch.manual_seed(0)
    learner = PrototypicalNetwork(Conv4(hidden=16, image_size=8, layers=2), example_dims=3)
    sampler = EpisodeSampler(tiny_dataset, 5, 1, 2, tasks_per_batch=2, seed=0)
    opt = torch.optim.Adam(learner.parameters(), 1e-2)
    first = None
    for i in range(40):
        loss, _ = learner.meta_loss(sampler.batch(i))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
