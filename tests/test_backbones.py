import torch
from torch.func import functional_call

from metamap.nets import MLP, Conv4


def test_conv4_shapes():
    assert Conv4()(torch.zeros(3, 1, 28, 28)).shape == (3, 64)
    net = Conv4(in_channels=3, hidden=32, image_size=84)
    assert net(torch.zeros(2, 3, 84, 84)).shape == (2, 32 * 5 * 5) and net.out_features == 800


def test_modules_work_through_functional_call():
    torch.manual_seed(0)
    for net, x in ((Conv4(hidden=8), torch.randn(4, 1, 28, 28)), (MLP(1, (40, 40), 1), torch.randn(5, 1))):
        net.eval()
        params = {k: v.detach().clone() for k, v in net.named_parameters()}
        buffers = dict(net.named_buffers())
        assert torch.allclose(functional_call(net, (params, buffers), (x,)), net(x))
        doubled = {k: 2 * v for k, v in params.items()}
        assert not torch.allclose(functional_call(net, (doubled, buffers), (x,)), net(x))


def test_mlp_regression_shape():
    assert MLP(1, (40, 40), 1)(torch.zeros(7, 1)).shape == (7, 1)
