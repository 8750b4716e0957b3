"""Corruptions: severities monotone, draws fixed by the seed, a wrapping data source that keeps classes and labels."""
import numpy as np
import pytest
import torch

from metamap import config as configlib
from metamap.data.corrupt import SEVERITIES, corrupt, gaussian_blur
from metamap.errors import ConfigError
from metamap.registry import data_source


def glyph_like(n=64, size=28, seed=0):
    """Bright strokes on black: a few random bars per image."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 1, size, size), np.uint8)
    for im in x:
        for _ in range(3):
            r, c = rng.integers(4, size - 8, 2)
            if rng.random() < 0.5:
                im[0, r:r + 2, c:c + 10] = 230
            else:
                im[0, r:r + 10, c:c + 2] = 230
    return torch.from_numpy(x)


@pytest.mark.parametrize("kind", list(SEVERITIES))
def test_severities_are_monotone(kind):
    x = glyph_like()
    clean = x.double()
    dist = [float((corrupt(x, kind, s, seed=3).double() - clean).abs().mean()) for s in range(1, 6)]
    assert all(a < b for a, b in zip(dist, dist[1:])), dist
    assert dist[0] > 0


@pytest.mark.parametrize("kind", ["noise", "contrast"])
def test_per_image_monotone_where_guaranteed(kind):
    x = glyph_like()
    d = torch.stack([(corrupt(x, kind, s).double() - x.double()).abs().flatten(1).mean(1) for s in range(1, 6)])
    assert bool((d[1:] >= d[:-1]).all())


def test_draws_fixed_by_seed_and_position():
    x = glyph_like(10)
    a, b = corrupt(x, "elastic", 3, seed=1), corrupt(x, "elastic", 3, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, corrupt(x, "elastic", 3, seed=2))
    # chunking does not change an image's draw: image i is image i whatever the chunk
    assert torch.equal(torch.cat([corrupt(x[:4], "noise", 2, 0, 0), corrupt(x[4:], "noise", 2, 0, 4)]),
                       corrupt(x, "noise", 2))


def test_blur_preserves_mass_and_contrast_keeps_mean():
    x = torch.zeros(1, 1, 21, 21, dtype=torch.float64)
    x[0, 0, 10, 10] = 1.0
    y = gaussian_blur(x, 1.0)
    assert float(y.sum()) == pytest.approx(1.0, abs=1e-12)
    k = np.exp(-0.5 * np.arange(-3, 4) ** 2)                # the 7-tap kernel at sd 1, normalised
    assert float(y[0, 0, 10, 10]) == pytest.approx((1 / k.sum()) ** 2, abs=1e-12)
    img = glyph_like(1)
    low = corrupt(img, "contrast", 5).double()
    assert float(low.mean()) == pytest.approx(float(img.double().mean()), abs=0.6)


def test_rotation_by_the_stated_angle():
    x = torch.zeros(1, 1, 29, 29, dtype=torch.uint8)
    x[0, 0, 14, 14:] = 255                                  # a ray pointing right from the centre
    y = corrupt(x, "rotation", 5).double()[0, 0]            # 50 degrees one way or the other
    rows, cols = torch.nonzero(y > 100, as_tuple=True)
    angle = np.degrees(np.arctan2(-float((rows.double() - 14).mean()), float((cols.double() - 14).mean())))
    assert abs(abs(angle) - 50) < 4


def test_bad_requests():
    x = glyph_like(2)
    with pytest.raises(ConfigError, match="corruption"):
        corrupt(x, "fog", 1)
    with pytest.raises(ConfigError, match="severity"):
        corrupt(x, "noise", 6)


def test_wrapping_source_keeps_classes_and_corrupts_chosen_splits():
    cfg = configlib.resolve(overrides=["data.name=corrupted", "data.corruption='blur'", "data.severity=2",
                                       "data.splits=['test']", "data.base.rotations=false"])
    source = data_source(cfg)
    base_cfg = configlib.resolve(overrides=["data.rotations=false"])
    base = data_source(base_cfg)
    test, clean = source.dataset(cfg, "test"), base.dataset(base_cfg, "test")
    assert test.class_names == clean.class_names and torch.equal(test.labels, clean.labels)
    assert not torch.equal(test.data, clean.data) and "blur, severity 2" in test.description
    assert torch.equal(source.dataset(cfg, "val").data, base.dataset(base_cfg, "val").data)
    with pytest.raises(ConfigError, match="splits"):          # refused when the config resolves
        configlib.resolve(base=cfg, overrides=["data.splits=['dev']"])
