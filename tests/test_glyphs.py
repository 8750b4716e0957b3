"""Printed glyphs: rendering is a function of the seed and the font files, recorded; missing fonts name their package."""
import numpy as np
import pytest

from metamap.data import glyphs
from metamap.data.glyphs import GLYPH_OPTIONS, SCRIPTS, Script, load_glyphs
from metamap.errors import ConfigError, DataError

CORE = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono.ttf")
pytestmark = pytest.mark.skipif(not all(f in glyphs.installed_fonts() for f in CORE),
                                reason="the DejaVu fonts (fonts-dejavu-core) are not installed")


@pytest.fixture(autouse=True)
def small_scripts(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(SCRIPTS, "t-latin", Script(((0x41, 0x48),), CORE))            # A..H
    monkeypatch.setitem(SCRIPTS, "t-greek", Script(((0x391, 0x398),), CORE))           # Alpha..Theta
    monkeypatch.setitem(SCRIPTS, "t-cyrillic", Script(((0x416, 0x41B),), CORE))        # Zhe..El


def opts(**kw):
    o = {**GLYPH_OPTIONS, "train_scripts": ["t-latin"], "val_scripts": ["t-cyrillic"], "test_scripts": ["t-greek"],
         "examples": 6, "image_size": 16, "dedupe": 1.0}
    o.update(kw)
    return o


def test_same_seed_same_data_set_other_seed_not():
    a, rec_a = load_glyphs(opts(), cache=False)
    b, rec_b = load_glyphs(opts(), cache=False)
    c, _ = load_glyphs(opts(seed=1), cache=False)
    for part in ("train", "val", "test"):
        assert np.array_equal(a[part].data, b[part].data)
    assert rec_a == rec_b
    assert not np.array_equal(a["train"].data, c["train"].data)
    assert a["train"].class_names == c["train"].class_names     # the characters do not depend on the seed here


def test_record_names_characters_fonts_and_rendering():
    data, rec = load_glyphs(opts(), cache=False)
    assert rec["scripts"]["t-latin"] == "ABCDEFGH"
    assert set(rec["fonts"]) == set(CORE)
    assert all(len(f["sha256"]) == 64 and f["package"] == "fonts-dejavu-core" for f in rec["fonts"].values())
    assert {"pillow", "freetype", "rendering", "images_sha256"} <= set(rec)
    assert data["train"].class_names[0] == "t-latin/U+0041 A"
    assert data["train"].class_counts().tolist() == [6] * 8


def test_examples_vary_and_jitter_zero_is_plain():
    data, _ = load_glyphs(opts(), cache=False)
    x = data["train"].data[data["train"].indices_of(0)].float()
    assert len({tuple(im.flatten().tolist()) for im in x}) == 6          # six different renderings of "A"
    plain, _ = load_glyphs(opts(jitter=0.0, examples=10), cache=False)
    assert plain["train"].data.float().mean() > 5                          # something was drawn


def test_missing_font_names_its_package(monkeypatch):
    monkeypatch.setitem(SCRIPTS, "t-latin", Script(((0x41, 0x42),), CORE + ("NotoSansNowhere-Regular.ttf",)))
    with pytest.raises(DataError, match=r"NotoSansNowhere-Regular.ttf.*apt-get install fonts-noto-core"):
        load_glyphs(opts(), cache=False)


def test_homoglyphs_are_left_out():
    # Latin A, B, E, H and Greek Alpha, Beta, Epsilon, Eta render alike in the same fonts.
    data, _ = load_glyphs(opts(train_scripts=["t-latin", "t-greek"], test_scripts=[], dedupe=0.9), cache=False)
    names = data["train"].class_names
    assert "t-latin/U+0041 A" in names and not any(n.startswith("t-greek/U+0391") for n in names)
    assert any(n.startswith("t-greek/U+0393") for n in names)              # Gamma looks like no Latin capital here


def test_cache_is_reused(monkeypatch):
    first, rec = load_glyphs(opts(), cache=True)
    monkeypatch.setattr(glyphs, "render_classes", lambda *a, **k: pytest.fail("rendered again"))
    again, rec2 = load_glyphs(opts(), cache=True)
    assert np.array_equal(first["test"].data, again["test"].data) and rec == rec2


def test_bad_options():
    with pytest.raises(ConfigError, match="script names"):
        load_glyphs(opts(test_scripts=["klingon"]), cache=False)
    with pytest.raises(ConfigError, match="only one of"):
        load_glyphs(opts(test_scripts=["t-latin"]), cache=False)
    with pytest.raises(ConfigError, match="examples"):
        load_glyphs(opts(examples=1), cache=False)


def test_splits_are_whole_scripts():
    data, _ = load_glyphs(opts(), cache=False)
    scripts = {p: {n.split("/")[0] for n in d.class_names} for p, d in data.items()}
    assert scripts == {"train": {"t-latin"}, "val": {"t-cyrillic"}, "test": {"t-greek"}}
    assert data["test"].spec.mean == data["train"].spec.mean            # normalised by the training images
