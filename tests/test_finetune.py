"""Fine-tuning baseline: pre-training on global labels, linear and cosine heads, backbone tuning, CLI."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metamap.algorithms.base import embed_tasks
from metamap.algorithms.finetune import CosineClassifier, FineTuneBaseline, TaskHead
from metamap.errors import MetamapError
from tests.learner_helpers import cli_train_eval, episode, learner


def test_cosine_classifier_by_hand():
    head = CosineClassifier(2, 2, scale=10.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    assert torch.allclose(head(torch.tensor([[3.0, 4.0]])), torch.tensor([[6.0, 8.0]]))   # 10 * (0.6, 0.8)


@pytest.mark.parametrize("norm", ["learned", "per_class"])
def test_cosine_scale_and_per_class_norm_receive_gradients(norm):
    net = learner("finetune", 'learner.head="cosine"', f'learner.cosine_norm="{norm}"', "learner.scale=10.0")
    head = net.classifier
    learned = head.scale if norm == "learned" else head.gain
    assert isinstance(learned, nn.Parameter) and learned in set(net.parameters())
    loss, _ = net.meta_loss(episode())
    loss.backward()
    assert learned.grad is not None and float(learned.grad.abs().sum()) > 0
    # By hand: logits = scale * gain_c * cos(z, w_c).
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]).repeat(6, 4)[:12, :head.weight.shape[1]])
    z = torch.randn(3, head.weight.shape[1])
    cos = F.normalize(z, dim=-1) @ F.normalize(head.weight, dim=-1).T
    gain = head.gain if norm == "per_class" else 1.0
    assert torch.allclose(head(z), 10.0 * cos * gain, atol=1e-6)


def test_fixed_cosine_scale_is_not_a_parameter_and_bad_norm_is_refused():
    from metamap.errors import ConfigError
    net = learner("finetune", 'learner.head="cosine"')
    assert net.classifier.scale == 10.0 and net.classifier.gain is None
    with pytest.raises(ConfigError, match="cosine_norm"):
        learner("finetune", 'learner.head="cosine"', 'learner.cosine_norm="l2"')


def test_per_class_task_head_fits_a_gain_per_class():
    z = torch.tensor([[[3.0, 4.0], [0.0, 2.0], [0.0, 5.0]]])
    y = torch.tensor([[0, 1, 1]])
    net = FineTuneBaseline(nn.Identity(), 1, features=2, num_classes=2, head="cosine", steps=0,
                           cosine_norm="per_class", scale=2.0)
    head = net.fit(nn.Identity(), z, y, 2)
    assert torch.equal(head.params[1], torch.ones(1, 2))
    assert torch.allclose(head(z[:, :1]), torch.tensor([[[2.0, 1.6]]]))      # 2 * 1 * (1, 0.8)
    net.steps = 5
    fitted = net.fit(nn.Identity(), z, y, 2)
    assert not torch.equal(fitted.params[1], torch.ones(1, 2))             # the gains were fitted
    support_loss = lambda h: float(F.cross_entropy(h(z)[0], y[0]))
    assert support_loss(fitted) < support_loss(head)


def test_pretraining_uses_global_class_ids():
    net = learner("finetune", classes=12)
    tasks = episode()
    loss, _ = net.meta_loss(tasks)
    x = torch.cat([tasks.support_x, tasks.query_x], 1)
    y = tasks.classes.gather(1, torch.cat([tasks.support_y, tasks.query_y], 1))    # episode -> global ids
    logits = net.classifier(embed_tasks(net.encoder, x))
    assert loss.item() == pytest.approx(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item(), rel=1e-5)
    tasks.classes = None
    with pytest.raises(MetamapError, match="global class ids"):
        net.meta_loss(tasks)


def test_linear_head_starts_at_zero_and_one_step_is_plain_sgd():
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    y = torch.tensor([[0, 1]])
    net = FineTuneBaseline(nn.Identity(), 1, features=2, num_classes=2, steps=0)
    assert net.fit(nn.Identity(), z, y, 2)(z).abs().sum() == 0
    # One step from W = 0, b = 0: the gradient of the mean CE is (softmax - onehot)^T z / 2 = (1/2 - onehot) z / 2.
    net.steps = 1
    head = net.fit(nn.Identity(), z, y, 2)
    weight, bias = head.params
    assert torch.allclose(weight[0], 0.01 * torch.tensor([[0.25, -0.25], [-0.25, 0.25]]))
    assert torch.allclose(bias, torch.zeros(1, 2))


def test_cosine_head_starts_from_normalised_class_means():
    z = torch.tensor([[[3.0, 4.0], [0.0, 2.0], [0.0, 5.0]]])
    head = TaskHead("cosine", z, torch.tensor([[0, 1, 1]]), 2, scale=1.0)
    assert torch.allclose(head.params[0], torch.tensor([[[0.6, 0.8], [0.0, 2.0]]]))
    assert torch.allclose(head(z[:, :1]), torch.tensor([[[1.0, 0.8]]]))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_fitted_heads_classify_their_support_set(kind):
    net = FineTuneBaseline(nn.Identity(), 1, features=3, num_classes=4, head=kind, steps=100)
    support = torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0]])
    with torch.no_grad():                      # the evaluator may call adapt without autograd
        logits = net.adapt(support, torch.tensor([0, 1, 2]))(support + 0.1)
    assert logits.argmax(-1).tolist() == [0, 1, 2]


def test_backbone_finetuning_leaves_the_learner_untouched():
    net = learner("finetune", "learner.finetune_backbone=true", "learner.steps=2").eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    tasks = episode()
    out = net.adapt(tasks.support_x, tasks.support_y)(tasks.query_x)
    assert out.shape == (2, 6, 3)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.requires_grad for p in net.parameters())


def test_deterministic_under_a_seed():
    a, b = (learner("finetune", "learner.steps=10", seed=9).eval() for _ in range(2))
    tasks = episode()
    assert torch.equal(a.adapt(tasks.support_x, tasks.support_y)(tasks.query_x),
                       b.adapt(tasks.support_x, tasks.support_y)(tasks.query_x))


@pytest.mark.integration
def test_cli_train_eval_and_checkpoint_round_trip(tmp_path):
    _, loaded = cli_train_eval(tmp_path, "finetune", 'learner.head="cosine"', "learner.steps=5")
    assert isinstance(loaded, FineTuneBaseline) and isinstance(loaded.classifier, CosineClassifier)
    assert loaded.adapts_with_gradients
