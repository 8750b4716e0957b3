"""ResNet-12, the backbone of most few-shot results on mini/tiered-ImageNet, CIFAR-FS and FC100.

As in TADAM (Oreshkin et al. 2018) and MetaOptNet (Lee et al. 2019): four residual blocks
with 64, 160, 320, 640 channels (``widths``; the older 64-128-256-512 variant is
``widths = [64, 128, 256, 512]``). Each block is

    x -> [conv3x3 -> BN -> LeakyReLU(0.1)] x 2 -> conv3x3 -> BN -> (+ shortcut(x)) -> LeakyReLU(0.1) -> max-pool 2

with a 1x1 convolution + BN as the shortcut (the channel count changes in every block).
Twelve layers in all: 4 blocks x 3 convolutions. An 84x84 image ends as 640 x 5 x 5
(84 -> 42 -> 21 -> 10 -> 5), a 32x32 one as 640 x 2 x 2; ``pool = "avg"`` (default) averages
that to 640 features, ``pool = "flatten"`` keeps all of them (MetaOptNet's choice).
DropBlock is not included.

The network is a plain ``nn.Module`` with parameters and BatchNorm buffers only, so it works
through ``torch.func.functional_call`` (the reference backend), and it declares how it lowers
for the fast backend (residual sums included), so MAML-style learners run all tasks at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from metamap.errors import ConfigError
from metamap.nets.program import Op, lower, lower_children
from metamap.options import Options, option
from metamap.registry import DataInfo, register_backbone


@dataclass(frozen=True, kw_only=True)
class ResNet12Options(Options):
    section = "model"
    widths: list[int] = option([64, 160, 320, 640], low=1, high=65536, length=4,
                               doc="channels of the four blocks")
    slope: float = option(0.1, low=0, high=1, high_open=True, doc="the LeakyReLU slope")
    pool: Literal["avg", "flatten"] = option("avg", doc="avg: one feature per channel; flatten: all of them")


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    # No bias: a BatchNorm follows every convolution.
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)


class ResidualBlock(nn.Module):
    """Three conv3x3+BN layers with a 1x1 shortcut, then LeakyReLU and 2x2 max-pooling.

    ``[B, in_channels, H, W]`` -> ``[B, out_channels, H // 2, W // 2]``.
    """

    def __init__(self, in_channels: int, out_channels: int, slope: float = 0.1):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(in_channels, out_channels), nn.BatchNorm2d(out_channels)
        self.conv2, self.bn2 = conv3x3(out_channels, out_channels), nn.BatchNorm2d(out_channels)
        self.conv3, self.bn3 = conv3x3(out_channels, out_channels), nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                      nn.BatchNorm2d(out_channels))
        self.act = nn.LeakyReLU(slope)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.pool(self.act(out + self.shortcut(x)))

    def lower(self, prefix: str = "") -> list[Op] | None:
        """For the fast backend: the sum of the main path and the shortcut, then activation and pooling."""
        main = lower_children(prefix, ("conv1", self.conv1), ("bn1", self.bn1), ("act", self.act),
                              ("conv2", self.conv2), ("bn2", self.bn2), ("act", self.act),
                              ("conv3", self.conv3), ("bn3", self.bn3))
        shortcut = lower_children(prefix, ("shortcut", self.shortcut))
        tail = lower_children(prefix, ("act", self.act), ("pool", self.pool))
        if main is None or shortcut is None or tail is None:
            return None
        return [Op("add", branches=(main, shortcut))] + tail


class ResNet12(nn.Module):
    """``[B, in_channels, S, S]`` -> features ``[B, out_features]``.

    ``out_features`` is ``widths[-1]`` with ``pool="avg"``, else ``widths[-1] * (S // 16) ** 2``.
    """

    example_dims = 3

    def __init__(self, in_channels: int = 3, widths=(64, 160, 320, 640), slope: float = 0.1,
                 pool: str = "avg", image_size: int = 84):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"ResNet12: widths must be four positive channel counts, not {list(widths)}")
        if pool not in ("avg", "flatten"):
            raise ValueError(f"ResNet12: pool must be 'avg' or 'flatten', not {pool!r}")
        side = image_size
        for _ in widths:
            side //= 2
        if side < 1:
            raise ValueError(f"ResNet12: four 2x2 poolings shrink a {image_size}x{image_size} image to "
                             "nothing; use images of at least 16x16")
        channels = (in_channels, *widths)
        self.blocks = nn.Sequential(*(ResidualBlock(a, b, slope)
                                      for a, b in zip(channels[:-1], channels[1:], strict=True)))
        self.pool = pool
        self.out_features = widths[-1] if pool == "avg" else widths[-1] * side * side
        self._init_weights(slope)

    def _init_weights(self, slope: float) -> None:
        # He initialisation for leaky ReLU; BN starts as the identity.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=slope, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(x)
        return x.mean((2, 3)) if self.pool == "avg" else x.flatten(1)

    def lower(self, prefix: str = "") -> list[Op] | None:
        """For the fast backend: the blocks, then the average over positions or the flattening."""
        blocks = lower(self.blocks, f"{prefix}.blocks" if prefix else "blocks")
        return None if blocks is None else blocks + [Op("mean_hw" if self.pool == "avg" else "flatten")]


@register_backbone("resnet12", options=ResNet12Options)
def _resnet12(o: ResNet12Options, info: DataInfo) -> ResNet12:
    c, h, w = info.image_shape("resnet12")
    if h != w:
        raise ConfigError(f"resnet12 expects square images, not {h}x{w}")
    try:
        return ResNet12(in_channels=c, widths=o.widths, slope=o.slope, pool=o.pool, image_size=h)
    except ValueError as e:
        raise ConfigError(str(e)) from None
