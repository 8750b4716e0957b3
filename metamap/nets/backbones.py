"""Backbones: plain ``nn.Module``s that also work through ``torch.func.functional_call``.

Each takes a flat batch ``[B, *example_shape]`` and returns features ``[B, out_features]``
(or outputs, for an MLP with an output layer). ``example_dims`` tells learners how many
dimensions one example has.
"""
from __future__ import annotations

from torch import Tensor, nn

from metamap.nets.program import Op, lower


def conv_block(in_channels: int, out_channels: int, norm: bool = True, pool: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 3, padding=1)]
    if norm:
        layers.append(nn.BatchNorm2d(out_channels))
    layers.append(nn.ReLU())
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Conv4(nn.Module):
    """``layers`` x [conv 3x3 (``hidden`` channels), BatchNorm, ReLU, max-pool 2], flattened.

    On 28x28 Omniglot images the output is ``hidden`` features (28 -> 14 -> 7 -> 3 -> 1);
    on 84x84 images, ``hidden * 5 * 5``. ``unpooled``: the last blocks that do not pool;
    ``feature_maps``: return the maps ``[B, hidden, side, side]`` (``out_shape``) instead of
    flattening them -- Relation Networks' embedding is ``unpooled = 2, feature_maps = true``.
    """

    example_dims = 3

    def __init__(self, in_channels: int = 1, hidden: int = 64, layers: int = 4, image_size: int = 28,
                 norm: bool = True, unpooled: int = 0, feature_maps: bool = False):
        super().__init__()
        if not 0 <= unpooled <= layers:
            raise ValueError(f"Conv4: unpooled must be between 0 and layers ({layers}), not {unpooled}")
        pooled = layers - unpooled
        self.features = nn.Sequential(*(conv_block(in_channels if i == 0 else hidden, hidden, norm, pool=i < pooled)
                                        for i in range(layers)))
        side = image_size
        for _ in range(pooled):
            side //= 2
        if side < 1:
            raise ValueError(f"Conv4: {pooled} pooling layers shrink a {image_size}x{image_size} image to nothing")
        self.feature_maps = feature_maps
        self.out_shape = (hidden, side, side)
        self.out_features = hidden * side * side

    def forward(self, x: Tensor) -> Tensor:
        maps = self.features(x)
        return maps if self.feature_maps else maps.flatten(1)

    def lower(self, prefix: str = "") -> list[Op] | None:
        """For the fast backend: the blocks' operations, then the flattening."""
        body = lower(self.features, f"{prefix}.features" if prefix else "features")
        return None if body is None or self.feature_maps else body + [Op("flatten")]


class MLP(nn.Module):
    """Fully connected layers with ReLU between them, e.g. ``MLP(1, (40, 40), 1)`` for regression."""

    example_dims = 1

    def __init__(self, in_features: int, hidden: tuple[int, ...] = (40, 40), out_features: int | None = None):
        super().__init__()
        sizes = [in_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        if out_features is not None:
            layers.append(nn.Linear(sizes[-1], out_features))
        self.net = nn.Sequential(*layers)
        self.out_features = out_features if out_features is not None else sizes[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))

    def lower(self, prefix: str = "") -> list[Op] | None:
        """For the fast backend: the flattening, then the layers."""
        body = lower(self.net, f"{prefix}.net" if prefix else "net")
        return None if body is None else [Op("flatten")] + body


class Flatten(nn.Module):
    """Examples as flat vectors times ``scale`` (no weights): MANN's paper feeds raw pixels, with no
    convolutions; the ``flatten`` backbone.

    The bundled Omniglot images are standardised (background -0.35, strokes 3.9), so a
    flattened 28x28 image has a norm of about 36 against the label one-hot's 1 in the LSTM's
    input. Measured (300 batches of 16, Adam 1e-3): with ``scale = 1`` the loss stays at ln 5,
    the controller not even learning to use the labels; with 0.2 it does.
    """

    def __init__(self, out_features: int, scale: float = 1.0):
        super().__init__()
        self.out_features, self.scale = out_features, scale

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) * self.scale
