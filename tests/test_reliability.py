"""Bad input gets a clear error, never a crash: image files, configs, episode requests (with fuzzing)."""
import io
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from metamap import config as configlib
from metamap.data.images import ImageSpec
from metamap.errors import ConfigError, DataError, EpisodeError
from metamap.tasks.sampler import EpisodeSampler


def png_bytes(mode="L", size=(12, 9), fmt="PNG"):
    arr = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    im = Image.fromarray(arr, "RGBA").convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("mode,fmt", [("1", "PNG"), ("L", "PNG"), ("P", "PNG"), ("RGB", "JPEG"), ("RGBA", "PNG"),
                                      ("LA", "PNG"), ("I;16", "PNG"), ("I", "TIFF"), ("CMYK", "JPEG"),
                                      ("F", "TIFF"), ("RGB", "BMP"), ("RGB", "GIF"), ("RGB", "WEBP"),
                                      ("RGBA", "WEBP"), ("L", "WEBP"), ("I;16", "TIFF"), ("CMYK", "TIFF"),
                                      ("YCbCr", "JPEG"), ("P", "GIF"), ("LA", "TIFF"), ("1", "TIFF")])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_common_mode_and_format_loads(tmp_path, mode, fmt, channels):
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(png_bytes(mode, fmt=fmt))
    spec = ImageSpec(size=8, channels=channels, mean=(0.5,) * channels, std=(0.5,) * channels)
    arr = spec.load(path)
    assert arr.shape == (channels, 8, 8) and arr.dtype == np.uint8


def test_a_float_image_with_a_nan_pixel_is_refused_not_blanked(tmp_path):
    arr = np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)
    Image.fromarray(arr, "F").save(tmp_path / "ok.tif")
    assert ImageSpec(size=10).load(tmp_path / "ok.tif").max() == 255      # rescaled, not clipped
    arr[3, 3] = np.nan
    Image.fromarray(arr, "F").save(tmp_path / "nan.tif")
    with pytest.raises(DataError, match=r"nan.tif: 1 of its 100 pixels are NaN or infinite"):
        ImageSpec(size=8).load(tmp_path / "nan.tif")
    arr[3, 3] = np.inf
    Image.fromarray(arr, "F").save(tmp_path / "inf.tif")
    with pytest.raises(DataError, match=r"inf.tif: 1 of its 100 pixels"):
        ImageSpec(size=8).load(tmp_path / "inf.tif")


@pytest.mark.parametrize("channels", [1, 3])
def test_a_lab_tiff_loads_as_its_colours(tmp_path, channels):
    from PIL import ImageCms
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8), "RGB")
    to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    lab = ImageCms.applyTransform(rgb, to_lab)
    lab.save(tmp_path / "lab.tif")
    assert Image.open(tmp_path / "lab.tif").mode == "LAB"
    spec = ImageSpec(size=8, channels=channels, mean=(0.0,) * channels, std=(1.0,) * channels)
    got = spec.load(tmp_path / "lab.tif").astype(int)
    want = spec.prepare(rgb).astype(int)
    # The round trip through 8-bit L*a*b* loses a few levels; taking the channels as RGB would be off by ~100.
    assert np.abs(got - want).mean() < 3 and np.abs(got - want).max() <= 16


def test_premultiplied_alpha_modes_load(tmp_path):
    spec = ImageSpec(size=4)
    for mode in ("La", "RGBa"):
        im = Image.new("RGBA", (5, 5), (200, 100, 50, 128)).convert(mode)
        assert spec.prepare(im).shape == (1, 4, 4), mode


def test_exif_orientation_is_applied_as_a_viewer_shows_it(tmp_path):
    arr = np.zeros((12, 20), np.uint8)
    arr[:, :5] = 255                                    # a bright band on the left
    exif = Image.Exif()
    exif[0x0112] = 6                                    # "rotate 90 degrees clockwise to view"
    Image.fromarray(arr, "L").save(tmp_path / "photo.jpg", exif=exif, quality=100)
    upright = np.rot90(arr, -1)                          # the band is now at the top
    got = ImageSpec(size=20).load(tmp_path / "photo.jpg")[0]
    want = ImageSpec(size=20).prepare(Image.fromarray(np.ascontiguousarray(upright), "L"))[0]
    assert np.abs(got.astype(int) - want.astype(int)).max() < 40 and got[:3].mean() > 200


def test_bad_files_name_the_file_and_the_fix(tmp_path):
    spec = ImageSpec(size=8)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.png: the file is empty"):
        spec.load(tmp_path / "empty.png")
    (tmp_path / "text.png").write_bytes(b"hello")
    with pytest.raises(DataError, match=r"text.png: cannot read this image .* remove or replace it"):
        spec.load(tmp_path / "text.png")
    (tmp_path / "cut.png").write_bytes(png_bytes()[:40])
    with pytest.raises(DataError, match="cut.png"):
        spec.load(tmp_path / "cut.png")
    with pytest.raises(DataError, match="no such file"):
        spec.load(tmp_path / "missing.png")


def test_absurdly_large_images_are_refused_before_decoding(tmp_path):
    # 9,000 x 9,000 pixels (10 MB as 1-bit): over the limit, refused from the header alone.
    im = Image.new("1", (9000, 9000))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    (tmp_path / "huge.png").write_bytes(buf.getvalue())
    with pytest.raises(DataError, match="larger than the"):
        ImageSpec(size=8).load(tmp_path / "huge.png")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_image_loader_only_clean_errors(tmp_path_factory, data):
    """Random bytes and mutated PNG/JPEG files end in an image or a DataError, nothing else."""
    base = data.draw(st.sampled_from([png_bytes("L"), png_bytes("RGB", fmt="JPEG"), png_bytes("P")]))
    kind = data.draw(st.sampled_from(["flip", "truncate", "random"]))
    if kind == "random":
        blob = data.draw(st.binary(max_size=300))
    elif kind == "truncate":
        blob = base[:data.draw(st.integers(0, len(base)))]
    else:
        blob = bytearray(base)
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
        blob = bytes(blob)
    path = tmp_path_factory.mktemp("fuzz") / "f.png"
    path.write_bytes(blob)
    try:
        arr = ImageSpec(size=8).load(path)
        assert arr.shape == (1, 8, 8)
    except DataError as e:
        assert "f.png" in str(e)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_fuzz_config_overrides_only_clean_errors(text):
    try:
        config = configlib.resolve(overrides=[text])
    except ConfigError as e:
        assert str(e)
    else:
        assert config["learner"]["name"] == "protonet"


@settings(max_examples=100, deadline=None)
@given(key=st.sampled_from(["train.steps", "optim.lr", "episode.ways", "episode.shots", "eval.episodes", "seed"]),
       value=st.one_of(st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=5), st.booleans()))
def test_fuzz_config_values_are_validated(key, value):
    text = repr(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    try:
        config = configlib.resolve(overrides=[f"{key}={text}"])
    except ConfigError:
        return
    section, _, name = key.rpartition(".")
    got = config[section][name] if section else config[name]
    if key == "optim.lr":
        assert got > 0
    else:
        assert isinstance(got, int) and got >= (0 if key in ("train.steps", "seed") else 1)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_episode_numbers_must_be_whole_and_positive(tiny_dataset, bad):
    with pytest.raises(EpisodeError, match="whole number >= 1"):
        EpisodeSampler(tiny_dataset, ways=3, shots=bad, queries=1)


def test_config_errors_say_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        configlib.resolve(overrides=["steps"])
    with pytest.raises(ConfigError, match="is a section"):
        configlib.resolve(overrides=["train=3"])
    (tmp_path / "bad.toml").write_text("[train\nsteps=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        configlib.resolve(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="cannot read config file"):
        configlib.resolve(tmp_path / "none.toml")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) colour in \[data\]"):
        from metamap.registry import data_source
        c = configlib.resolve(overrides=["data.colour=1"])
        data_source(c).info(c)


@pytest.mark.parametrize("member", ["images_background/../../evil/c/x.png", "/images_background/a/c/x.png",
                                    "images_background/a/../x.png", "link"])
def test_archives_with_escaping_paths_or_links_are_refused(tmp_path, member):
    import stat
    import zipfile

    from metamap.data.omniglot import omniglot_spec
    from metamap.data.omniglot_archives import read_archive
    path = tmp_path / "images_background.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("images_background/Alpha/character01/0001_01.png", png_bytes("1", (105, 105)))
        if member == "link":
            info = zipfile.ZipInfo("images_background/Alpha/character01/0002_01.png")
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
        else:
            zf.writestr(member, png_bytes("1", (105, 105)))
    with pytest.raises(DataError, match="link or a path outside"):
        read_archive(path, omniglot_spec())
