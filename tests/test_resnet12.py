"""ResNet-12: shapes at the benchmark resolutions, the published size, functional_call, config errors."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

from metamap import config as configlib
from metamap.errors import ConfigError
from metamap.nets.resnet12 import ResidualBlock, ResNet12
from metamap.registry import DataInfo, build_backbone


def test_output_shapes_at_84_and_32():
    net = ResNet12().eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 84, 84)).shape == (1, 640) and net.out_features == 640
        assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 640)
    flat = ResNet12(widths=(8, 8, 8, 16), pool="flatten", image_size=84).eval()
    assert flat(torch.zeros(1, 3, 84, 84)).shape == (1, 16 * 5 * 5) == (1, flat.out_features)   # 84->42->21->10->5
    flat32 = ResNet12(widths=(8, 8, 8, 16), pool="flatten", image_size=32)
    assert flat32.out_features == 16 * 2 * 2


def test_architecture_matches_the_literature():
    net = ResNet12()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert sum(m.kernel_size == (3, 3) for m in convs) == 12          # 4 blocks x 3 conv3x3
    assert sum(m.kernel_size == (1, 1) for m in convs) == 4           # one 1x1 shortcut per block
    assert [b.conv1.out_channels for b in net.blocks] == [64, 160, 320, 640]
    assert all(isinstance(b.act, nn.LeakyReLU) and b.act.negative_slope == 0.1 for b in net.blocks)
    # About 12.4M parameters, the figure reported for this network (e.g. Lee et al. 2019).
    assert 12.3e6 < sum(p.numel() for p in net.parameters()) < 12.5e6
    narrow = ResNet12(widths=(64, 128, 256, 512))
    assert narrow.out_features == 512 and narrow(torch.zeros(1, 3, 16, 16)).shape == (1, 512)


def test_block_halves_the_resolution():
    assert ResidualBlock(3, 5)(torch.zeros(2, 3, 10, 10)).shape == (2, 5, 5, 5)


def test_works_through_functional_call():
    torch.manual_seed(0)
    net = ResNet12(widths=(2, 2, 4, 4), image_size=16)
    x = torch.randn(3, 3, 16, 16)
    params = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    net.eval()
    out = functional_call(net, (params, buffers), (x,))
    assert torch.allclose(out, net(x), atol=1e-6)
    out.pow(2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())
    # Second-order gradients (MAML) flow through the functional form too.
    net.train()
    loss = functional_call(net, (params, buffers), (x,)).pow(2).mean()
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    meta = sum(g.pow(2).sum() for g in grads)
    meta.backward()


def test_registered_backbone_and_config_errors():
    config = configlib.resolve(overrides=["model.backbone='resnet12'", "model.widths=[8, 8, 16, 16]"])
    assert config["model"]["pool"] == "avg" and config["model"]["slope"] == 0.1
    net = build_backbone(config, DataInfo(example_shape=(3, 32, 32)))
    assert isinstance(net, ResNet12) and net.out_features == 16 and net.example_dims == 3
    defaults = configlib.resolve(overrides=["model.backbone='resnet12'"])
    assert defaults["model"]["widths"] == [64, 160, 320, 640]
    for bad in (["model.widths=[8, 8, 8]"], ["model.pool='max'"], ["model.slope=2"], ["model.depth=12"]):
        with pytest.raises(ConfigError):     # refused when the config resolves, before anything is built
            configlib.resolve(overrides=["model.backbone='resnet12'", *bad])
    with pytest.raises(ConfigError, match="at least 16x16"):
        build_backbone(config, DataInfo(example_shape=(3, 8, 8)))
    with pytest.raises(ConfigError, match="image data"):
        build_backbone(config, DataInfo(example_shape=(10,)))


@pytest.mark.parametrize("backbone", ["conv4", "resnet12"])
def test_image_backbones_refuse_examples_that_are_not_images(backbone):
    from metamap.config import resolve
    from metamap.errors import ConfigError
    from metamap.registry import DataInfo, build_learner
    config = resolve(None, ['learner.name="protonet"', f'model.backbone="{backbone}"'])
    with pytest.raises(ConfigError, match=rf"model.backbone = '{backbone}' needs image data .* shape \[4\]"):
        build_learner(config, DataInfo((4,)))
