"""``adapt()`` names a wrong input (its shape, type or value, and the fix) instead of failing in a layer."""
import pytest
import torch

from metamap import config as configlib
from metamap.algorithms.protonet import PrototypicalNetwork
from metamap.data.images import ImageSpec
from metamap.errors import MetamapError
from metamap.nets import Conv4
from metamap.registry import DataInfo, build_learner


def built(learner="protonet", shape=(1, 28, 28), problem="classification", *overrides):
    config = configlib.resolve(overrides=[f"learner.name='{learner}'", "model.hidden=4", *overrides])
    spec = ImageSpec(size=shape[-1], channels=shape[0]) if len(shape) == 3 else None
    torch.manual_seed(0)
    model = build_learner(config, DataInfo(shape, problem=problem, spec=spec, output_dim=1)).eval()
    model.spec = spec
    return model


@pytest.fixture(scope="module")
def protonet():
    return built()


def images(n, c=1, size=28, tasks=None):
    shape = (n, c, size, size) if tasks is None else (tasks, n, c, size, size)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(n))


LABELS = torch.tensor([0, 0, 1, 1])
BAD_SUPPORT = {
    "3-channel input to a 1-channel model": (lambda: images(4, c=3), LABELS, None,
                                             r"shape \(3, 28, 28\), but this learner was built for channels x "
                                             r"height x width \(1, 28, 28\); prepare image files with learner.spec"),
    "5x5 images": (lambda: images(4, size=5), LABELS, None, r"shape \(1, 5, 5\), but this learner was built"),
    "uint8 input": (lambda: torch.zeros(4, 1, 28, 28, dtype=torch.uint8), LABELS, None,
                    r"torch.uint8, but the model takes floating-point inputs; prepare image files with "
                    r"learner.spec.to_input"),
    "float labels for a classifier": (lambda: images(4), LABELS.float(), None,
                                      r"support_y is torch.float32, but a classifier takes whole-number class "
                                      r"labels 0..N-1"),
    "bool labels": (lambda: images(4), LABELS.bool(), None, r"torch.bool, but a classifier"),
    "empty support set": (lambda: images(0), torch.zeros(0, dtype=torch.long), None, "the support set is empty"),
    "ways=1": (lambda: images(2), torch.tensor([0, 0]), 1, r"at least two classes, not 1 \(ways = 1\)"),
    "one class only": (lambda: images(2), torch.tensor([0, 0]), None, r"at least two classes"),
    "negative label": (lambda: images(4), torch.tensor([0, -1, 1, 1]), None, r"holds the label -1; class labels "
                                                                             r"are 0..N-1"),
    "label out of range": (lambda: images(4), torch.tensor([0, 1, 2, 3]), 2, r"holds the label 3, but a 2-way "
                                                                             r"task has labels 0..1"),
    "a class without examples": (lambda: images(4), torch.tensor([0, 0, 2, 2]), None, "cover every class"),
    "float64 input": (lambda: images(4).double(), LABELS, None, r"torch.float64 on cpu, but the model's weights "
                                                                 r"are torch.float32 on cpu; convert with"),
    "NaN pixel": (lambda: images(4).index_put_((torch.tensor([1]),), torch.tensor(float("nan"))), LABELS, None,
                  "NaN or infinite"),
    "labels of another length": (lambda: images(4), torch.tensor([0, 1]), None, "one label per example"),
    "not numbers": (lambda: [["a"]], LABELS, None, "must be a tensor or an array of numbers"),
    "ways not a number": (lambda: images(4), LABELS, "two", "ways must be a whole number"),
    "a flat vector": (lambda: torch.zeros(784), torch.tensor([0]), None, r"expected \[examples, \*example\]"),
}


@pytest.mark.parametrize("case", list(BAD_SUPPORT))
def test_bad_support_sets_are_named(protonet, case):
    x, y, ways, message = BAD_SUPPORT[case]
    with pytest.raises(MetamapError, match=message):
        protonet.adapt(x(), y, ways)


def test_bad_queries_are_named(protonet):
    predictor = protonet.adapt(images(4), LABELS)
    with pytest.raises(MetamapError, match=r"query_x holds examples of shape \(1, 20, 20\) but the support set's "
                                           r"are \(1, 28, 28\)"):
        predictor(images(2, size=20))
    with pytest.raises(MetamapError, match="torch.uint8"):
        predictor(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    batched = protonet.adapt(images(4, tasks=2), LABELS.repeat(2, 1))
    with pytest.raises(MetamapError, match=r"query_x has 3 task\(s\) but the predictor was adapted to 2"):
        batched(images(5, tasks=3))
    assert batched(images(5, tasks=2)).shape == (2, 5, 2)      # and the right inputs still work
    assert predictor(images(3)).shape == (3, 2)


def test_numpy_labels_and_ways_work(protonet):
    import numpy as np
    out = protonet.adapt(images(4).numpy(), np.array([0, 0, 1, 1]), np.int64(2))(images(3))
    assert out.shape == (3, 2)


def test_a_fixed_head_learner_names_its_ways():
    maml = built("maml", (1, 28, 28), "classification", "episode.ways=3", "learner.cpp_kernels=false")
    with torch.enable_grad(), pytest.raises(MetamapError, match="head has 3 outputs"):
        maml.adapt(images(4), LABELS)


def test_regression_targets_are_checked():
    learner = built("maml", (1,), "regression", "model.backbone='mlp'", "model.hidden=[8]", "learner.cpp_kernels=false")
    x = torch.randn(5, 1)
    with pytest.raises(MetamapError, match=r"torch.int64; this learner regresses real-valued targets"):
        learner.adapt(x, torch.arange(5))
    with pytest.raises(MetamapError, match="support_y contains NaN"):
        learner.adapt(x, torch.full((5, 1), float("nan")))
    with torch.enable_grad():
        assert learner.adapt(x, torch.randn(5, 1))(torch.randn(3, 1)).shape == (3, 1)


def test_a_hand_built_learner_names_the_shape_the_layer_refused():
    learner = PrototypicalNetwork(Conv4(hidden=4, image_size=28), example_dims=3).eval()   # no example_shape
    with pytest.raises(MetamapError, match=r"adapt failed on inputs of shape \(1, 4, 1, 5, 5\)"):
        learner.adapt(images(4, size=5), LABELS)
    with pytest.raises(MetamapError, match=r"adapt failed on inputs of shape \(1, 4, 3, 28, 28\)"):
        learner.adapt(images(4, c=3), LABELS)
