"""Omniglot: bundled arrays, splits, the archive reader, caching, data-root choice, the build script.

Reading all 32k real drawings takes tens of seconds, so the reader is tested on small synthetic
archives with the official layout, plus a few real members checked against the bundled copy.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metamap.data import cache, omniglot, omniglot_archives, omniglot_splits
from metamap.data.images import ImageSpec
from metamap.data.omniglot import BUNDLED_PATH, load_omniglot, omniglot_spec
from metamap.data.omniglot_archives import ARCHIVES, CharacterSet, read_archive
from metamap.data.omniglot_splits import LAKE_VAL_ALPHABETS
from metamap.data.archives import open_zip
from metamap.data.paths import data_root, user_cache_dir
from metamap.errors import ConfigError, DataError, DownloadError

REPO = Path(__file__).resolve().parents[1]
SHARED = Path("/work/shared/data/omniglot")
TINY_BACKGROUND = ["Bengali/character01", "Bengali/character02", "Greek/character01",
                   "Greek/character02", "Greek/character03", "Latin/character01", "Latin/character02"]
TINY_EVALUATION = ["Angelic/character01", "Angelic/character02", "ULOG/character01", "ULOG/character02"]


# -- synthetic archives with the official layout -----------------------------------------
def drawing_png(seed: int, size: int = 105) -> bytes:
    """A 1-bit PNG like Omniglot's: dark strokes on white."""
    rng = np.random.default_rng(seed)
    pixels = np.ones((size, size), dtype=bool)
    for _ in range(4):
        r, c = rng.integers(0, size - 10, 2)
        pixels[r:r + rng.integers(2, 10), c:c + rng.integers(2, 30)] = False
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def archive_members(top: str, characters: list[str], drawings: int = 2, seed: int = 0) -> dict[str, bytes]:
    """Member name -> PNG bytes, named as in the official archives (``0001_01.png`` ...)."""
    members = {}
    for i, character in enumerate(characters, start=1):
        for d in range(1, drawings + 1):
            members[f"{top}/{character}/{i:04d}_{d:02d}.png"] = drawing_png(seed * 100_000 + i * 100 + d)
    return members


def write_zip(path: Path, members: dict[str, bytes], shuffle_seed: int | None = None,
              date_time=(2015, 6, 1, 12, 0, 0), extra: dict[str, bytes] | None = None) -> Path:
    """A zip with folder entries like the official one; ``shuffle_seed`` packs members in another order."""
    names = list(members)
    if shuffle_seed is not None:
        names = [names[i] for i in np.random.default_rng(shuffle_seed).permutation(len(names))]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        folders = sorted({n.rsplit("/", k)[0] + "/" for n in members for k in (1, 2, 3)})
        for folder in folders:
            zf.writestr(zipfile.ZipInfo(folder, date_time), b"")
        for name in names:
            zf.writestr(zipfile.ZipInfo(name, date_time), members[name])
        for name, data in (extra or {}).items():
            zf.writestr(zipfile.ZipInfo(name, date_time), data)
    return path


def tiny_archives(folder: Path, **kw) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return {"background": write_zip(folder / ARCHIVES["background"],
                                    archive_members("images_background", TINY_BACKGROUND, seed=1), **kw),
            "evaluation": write_zip(folder / ARCHIVES["evaluation"],
                                    archive_members("images_evaluation", TINY_EVALUATION, seed=2), **kw)}


@pytest.fixture
def tiny_omniglot(monkeypatch):
    """Let the tiny archives pass as complete: 7 + 4 characters, Bengali as the val alphabet."""
    monkeypatch.setattr(omniglot_archives, "EXPECTED_COUNTS", {"background": (3, 7), "evaluation": (2, 4)})
    monkeypatch.setattr(omniglot_splits, "LAKE_VAL_ALPHABETS", ("Bengali",))


@pytest.fixture
def isolated_dirs(tmp_path, monkeypatch):
    """No METAMAP_DATA, and a per-user cache inside tmp_path."""
    monkeypatch.delenv("METAMAP_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path


# -- bundled copy ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundled() -> dict[str, CharacterSet]:
    sets = omniglot.load_bundled()
    assert sets is not None, f"{BUNDLED_PATH} is missing or stale; run scripts/build_bundled_omniglot.py"
    return sets


@pytest.fixture(scope="module")
def lake(bundled):
    return omniglot_splits.make_splits(bundled, "lake", rotations=True, spec=omniglot_spec())


def test_bundled_counts_and_shapes(bundled):
    for name, (alphabets, characters) in omniglot_archives.EXPECTED_COUNTS.items():
        chars = bundled[name]
        assert chars.images.dtype == np.uint8 and chars.images.shape == (characters * 20, 1, 28, 28)
        assert len(chars.names) == characters and len(chars.alphabets()) == alphabets
        assert np.bincount(chars.labels).tolist() == [20] * characters
        assert chars.names == sorted(chars.names)
    assert not set(bundled["background"].alphabets()) & set(bundled["evaluation"].alphabets())


def test_bundled_file_is_small_and_licensed():
    assert BUNDLED_PATH.stat().st_size < 8_000_000
    notice = (BUNDLED_PATH.parent / "LICENSE-omniglot").read_text()
    assert "MIT License" in notice and "Brenden Lake" in notice


def test_normalisation_constants_fit_the_background_set(bundled):
    x = omniglot_spec(28).to_input(torch.from_numpy(bundled["background"].images[::5]))
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1) < 0.02


def test_lake_split(lake, bundled):
    train, val, test = lake["train"], lake["val"], lake["test"]
    base = lambda names: {n.split("@")[0] for n in names}
    assert train.num_classes == 813 * 4 and val.num_classes == 151 and test.num_classes == 659
    assert not base(train.class_names) & set(val.class_names)
    assert {n.split("/")[0] for n in val.class_names} == set(LAKE_VAL_ALPHABETS)
    assert base(train.class_names) | set(val.class_names) == set(bundled["background"].names)
    assert test.class_names == bundled["evaluation"].names
    assert test.description == "Omniglot lake split, test: evaluation alphabets (659 characters)"
    for ds in (train, val, test):
        assert ds.data.dtype == torch.uint8 and ds.example_shape == (1, 28, 28)
        assert ds.spec == omniglot_spec(28) and ds.class_counts().tolist() == [20] * ds.num_classes


def test_rotations_only_in_train(lake):
    train = lake["train"]
    assert all("@" not in n for n in lake["val"].class_names + lake["test"].class_names)
    assert sum("@rot" in n for n in train.class_names) == 3 * 813
    c = train.class_names.index("Greek/character05")
    r = train.class_names.index("Greek/character05@rot90")
    original, rotated = train.data[train.indices_of(c)], train.data[train.indices_of(r)]
    assert torch.equal(rotated, torch.rot90(original, 1, dims=(-2, -1)))


def test_rotations_off(bundled):
    train = omniglot_splits.make_splits(bundled, "lake", rotations=False, spec=omniglot_spec())["train"]
    assert train.num_classes == 813 and all("@" not in n for n in train.class_names)


def test_vinyals_split(bundled):
    splits = omniglot_splits.make_splits(bundled, "vinyals", rotations=True, spec=omniglot_spec())
    assert [splits[k].num_classes for k in ("train", "val", "test")] == [4112, 688, 1692]
    chars = {k: {n.split("@")[0] for n in ds.class_names} for k, ds in splits.items()}
    assert [len(chars[k]) for k in ("train", "val", "test")] == [1028, 172, 423]
    train, val, test = chars["train"], chars["val"], chars["test"]
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(bundled["background"].names + bundled["evaluation"].names)
    # The published lists: 13 evaluation alphabets for testing, Gurmukhi shared by both sides.
    alphabets = lambda names: {n.split("/")[0] for n in names}
    assert len(alphabets(test)) == 13 and alphabets(test) <= set(bundled["evaluation"].alphabets())
    assert alphabets(test) & alphabets(train | val) == {"Gurmukhi"}
    assert "Gurmukhi/character42" in test
    assert all(len(ds.labels) == 20 * ds.num_classes for ds in splits.values())


def test_vinyals_trainval_split(bundled):
    splits = omniglot_splits.make_splits(bundled, "vinyals-trainval", rotations=True, spec=omniglot_spec())
    assert splits["train"].num_classes == 4800 and splits["test"].num_classes == 1692
    train = {n.split("@")[0] for n in splits["train"].class_names}
    test = {n.split("@")[0] for n in splits["test"].class_names}
    assert len(train) == 1200 and not train & test          # no test character in training
    assert {n.split("@")[0] for n in splits["val"].class_names} <= train


def test_vinyals_rotations_are_listed_classes(bundled):
    test = omniglot_splits.make_splits(bundled, "vinyals", spec=omniglot_spec())["test"]
    c = test.class_names.index("Gurmukhi/character42")
    for k, degrees in enumerate((90, 180, 270), start=1):
        r = test.class_names.index(f"Gurmukhi/character42@rot{degrees}")
        assert torch.equal(test.data[test.indices_of(r)], torch.rot90(test.data[test.indices_of(c)], k, dims=(-2, -1)))
    plain = omniglot_splits.make_splits(bundled, "vinyals", rotations=False, spec=omniglot_spec())
    assert [plain[k].num_classes for k in ("train", "val", "test")] == [1028, 172, 423]


def test_vinyals_lists_are_shipped():
    from metamap.data.splits import SPLIT_DIR, published
    lists = published("omniglot-vinyals", ("train", "val", "trainval", "test"))
    assert [len(lists[k]) for k in ("train", "val", "trainval", "test")] == [4112, 688, 4800, 1692]
    assert sorted(lists["train"] + lists["val"]) == sorted(lists["trainval"])
    assert "Jake Snell" in (SPLIT_DIR / "LICENSE-omniglot-vinyals").read_text()


def test_bad_split_and_size():
    with pytest.raises(ConfigError):
        load_omniglot(split="random")
    with pytest.raises(ConfigError):
        load_omniglot(image_size=0)


def test_size_28_needs_no_data_root(isolated_dirs, monkeypatch):
    def no_archives(*a, **k):
        raise AssertionError("the bundled copy should have been used")
    monkeypatch.setattr(omniglot, "locate_archives", no_archives)
    splits = load_omniglot(root=isolated_dirs / "nowhere", download=False)
    assert splits["test"].num_classes == 659
    assert not (isolated_dirs / "nowhere").exists()


@pytest.mark.skipif(not all((SHARED / a).is_file() for a in ARCHIVES.values()),
                    reason="the real Omniglot archives are not present")
def test_real_members_match_bundled(bundled, tmp_path):
    spec = omniglot_spec(28)
    for name in omniglot_archives.SETS:
        with open_zip(SHARED / ARCHIVES[name], omniglot_archives.MAX_MEMBER_BYTES, "") as archive:
            members = omniglot_archives.archive_members(archive, Path(ARCHIVES[name]).stem)
            characters = [m.name.split("/", 1)[1].rsplit("/", 1)[0] for m in members]
            assert sorted(set(characters)) == bundled[name].names
            assert [bundled[name].names[i] for i in bundled[name].labels] == characters
            for i in (0, 1, 777, len(members) - 1):
                path = tmp_path / f"{name}_{i}.png"
                path.write_bytes(archive.read(members[i]))
                # spec.load on a loose file is what `metamap predict` does to user images.
                assert np.array_equal(spec.load(path), bundled[name].images[i]), members[i].name


# -- the archive reader ------------------------------------------------------------------
def test_read_archive_layout_order_and_pixels(tmp_path):
    members = archive_members("images_background", TINY_BACKGROUND, drawings=3)
    path = write_zip(tmp_path / "images_background.zip", members, shuffle_seed=3,
                     extra={"__MACOSX/images_background/._x.png": b"junk",
                            "images_background/Greek/.DS_Store": b"junk"})
    spec = omniglot_spec(20)
    chars = read_archive(path, spec)
    assert chars.names == TINY_BACKGROUND
    assert chars.labels.tolist() == [c for c in range(len(TINY_BACKGROUND)) for _ in range(3)]
    assert chars.images.shape == (len(TINY_BACKGROUND) * 3, 1, 20, 20) and chars.images.dtype == np.uint8
    first = sorted(members)[4]
    (tmp_path / "one.png").write_bytes(members[first])
    assert np.array_equal(chars.images[4], spec.load(tmp_path / "one.png"))


@pytest.mark.parametrize("bad_member", [
    "images_background/Greek/0001_01.png",                      # drawing outside a character folder
    "images_background/Greek/character01/extra/0001_01.png",    # one level too deep
    "images_background/Greek/character01/notes.txt",            # not a drawing
    "images_evaluation/Greek/character01/0001_01.png",          # wrong top folder
])
def test_read_archive_rejects_wrong_layout(tmp_path, bad_member):
    members = archive_members("images_background", TINY_BACKGROUND[:2])
    members[bad_member] = drawing_png(0)
    path = write_zip(tmp_path / "images_background.zip", members)
    with pytest.raises(DataError, match="unexpected member"):
        read_archive(path, omniglot_spec(28))


def test_read_archive_rejects_damaged_files(tmp_path):
    members = archive_members("images_background", TINY_BACKGROUND[:2])
    good = write_zip(tmp_path / "images_background.zip", members)
    for name, data in [("garbage.zip", b"not a zip at all"), ("cut.zip", good.read_bytes()[:300])]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match="damaged|not a readable zip"):
            read_archive(tmp_path / name, omniglot_spec(28), top="images_background")
    members[sorted(members)[1]] = b"\x89PNG broken"
    with pytest.raises(DataError, match="cannot read"):
        read_archive(write_zip(tmp_path / "images_background.zip", members), omniglot_spec(28))
    with pytest.raises(DataError, match="no drawings"):
        read_archive(write_zip(tmp_path / "images_background.zip", {}), omniglot_spec(28))
    with pytest.raises(DataError, match="no such file"):
        read_archive(tmp_path / "missing.zip", omniglot_spec(28))


def test_incomplete_archive_is_refused(tmp_path, isolated_dirs):
    archives = tiny_archives(tmp_path / "data" / "omniglot")  # EXPECTED_COUNTS left official
    with pytest.raises(DataError, match="964 in 30"):
        omniglot_archives.read_archives(archives, omniglot_spec(14), progress=False)


# -- archives -> splits, caching, data root ----------------------------------------------
def test_archives_at_other_size_are_read_and_cached(tiny_omniglot, isolated_dirs, monkeypatch):
    tiny_archives(isolated_dirs / "data" / "omniglot")
    splits = load_omniglot(image_size=14, root=isolated_dirs / "data", download=False, progress=False)
    assert splits["train"].num_classes == 5 * 4 and splits["val"].num_classes == 2
    assert splits["test"].class_names == TINY_EVALUATION
    assert splits["train"].spec == omniglot_spec(14) and splits["train"].example_shape == (1, 14, 14)
    entry = isolated_dirs / "data" / "omniglot" / "metamap-cache" / "omniglot-14"
    assert (entry / "meta.json").is_file() and not list(entry.glob("*.part"))

    def no_decoding(*a, **k):
        raise AssertionError("the cache should have been used")
    monkeypatch.setattr(omniglot_archives, "read_archive", no_decoding)
    again = load_omniglot(image_size=14, root=isolated_dirs / "data", download=False, progress=False)
    assert torch.equal(again["train"].data, splits["train"].data)


def test_cache_is_rebuilt_when_archives_change(tiny_omniglot, isolated_dirs):
    folder = isolated_dirs / "data"
    tiny_archives(folder)  # directly in the root also works
    first = omniglot.load_omniglot_sets(14, root=folder, download=False, progress=False)
    write_zip(folder / ARCHIVES["evaluation"], archive_members("images_evaluation", TINY_EVALUATION, seed=9))
    second = omniglot.load_omniglot_sets(14, root=folder, download=False, progress=False)
    assert not np.array_equal(first["evaluation"].images, second["evaluation"].images)


def test_cache_falls_back_to_user_cache(tiny_omniglot, isolated_dirs, monkeypatch):
    archives = tiny_archives(isolated_dirs / "readonly")
    real_write = cache.write_entry

    def refuse_archive_folder(folder, *a, **k):
        if archives["background"].parent in Path(folder).parents:
            raise PermissionError("read-only")
        return real_write(folder, *a, **k)
    monkeypatch.setattr(cache, "write_entry", refuse_archive_folder)
    omniglot.cached_sets(archives, omniglot_spec(14), progress=False)
    assert len(list((user_cache_dir() / "omniglot-14").glob("*/meta.json"))) == 1
    assert not (archives["background"].parent / "metamap-cache").exists()


def test_missing_archives_without_download(isolated_dirs):
    with pytest.raises(DataError, match="images_background.zip and images_evaluation.zip") as e:
        load_omniglot(image_size=14, root=isolated_dirs / "empty", download=False)
    assert str(isolated_dirs / "empty" / "omniglot") in str(e.value)


def test_download_into_data_root(tiny_omniglot, isolated_dirs, monkeypatch, http_files):
    source = tiny_archives(isolated_dirs / "server")
    table = {}
    for name, path in source.items():
        data = path.read_bytes()
        http_files(f"/mirror/{ARCHIVES[name]}", data)
        table[ARCHIVES[name]] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                 "md5": hashlib.md5(data).hexdigest()}
    monkeypatch.setattr(omniglot_archives, "OFFICIAL_CHECKSUMS", table)
    monkeypatch.setenv("METAMAP_OMNIGLOT_URL", http_files.base + "/mirror")
    splits = load_omniglot(image_size=14, root=isolated_dirs / "root", progress=False)
    assert splits["test"].num_classes == 4
    fetched = isolated_dirs / "root" / "omniglot" / ARCHIVES["background"]
    assert fetched.read_bytes() == source["background"].read_bytes()

    table[ARCHIVES["evaluation"]] = dict(table[ARCHIVES["evaluation"]], sha256="0" * 64)
    with pytest.raises(DownloadError, match="SHA256"):
        omniglot_archives.locate_archives(isolated_dirs / "other", progress=False)
    assert not (isolated_dirs / "other" / "omniglot" / ARCHIVES["evaluation"]).exists()


def test_official_urls_and_checksums(monkeypatch):
    monkeypatch.delenv("METAMAP_OMNIGLOT_URL", raising=False)
    assert omniglot_archives.archive_urls()["evaluation"] == \
        "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_evaluation.zip"
    assert omniglot_archives.archive_urls("http://x/y/")["background"] == "http://x/y/images_background.zip"
    for check in omniglot_archives.OFFICIAL_CHECKSUMS.values():
        assert len(check["sha256"]) == 64 and len(check["md5"]) == 32 and check["size"] > 1_000_000


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("METAMAP_DATA", raising=False)
    assert data_root() == tmp_path / "home" / ".cache" / "metamap"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert data_root() == tmp_path / "home" / ".cache" / "metamap"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_root() == tmp_path / "xdg" / "metamap"
    monkeypatch.setenv("METAMAP_DATA", str(tmp_path / "env"))
    assert data_root() == data_root("") == tmp_path / "env"
    assert data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data_root("~/d") == tmp_path / "home" / "d"


# -- the build script --------------------------------------------------------------------
def _build_script():
    path = REPO / "scripts" / "build_bundled_omniglot.py"
    spec = importlib.util.spec_from_file_location("build_bundled_omniglot", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_script_is_reproducible(tmp_path, capsys):
    build = _build_script()
    # The same images packed in another order with other timestamps must give the same bytes.
    tiny_archives(tmp_path / "a")
    tiny_archives(tmp_path / "b", shuffle_seed=5, date_time=(2021, 11, 15, 17, 30, 36))
    outputs = []
    for folder in ("a", "b"):
        out = tmp_path / f"{folder}.npz"
        assert build.main(["--archives", str(tmp_path / folder), "--out", str(out), "--size", "12",
                           "--skip-count-check", "--quiet"]) == 0
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    assert f"sha256 {hashlib.sha256(outputs[0]).hexdigest()}" in capsys.readouterr().out
    sets, meta = omniglot.read_sets(tmp_path / "a.npz")
    assert ImageSpec.from_dict(meta["spec"]) == omniglot_spec(12)
    assert sets["evaluation"].names == TINY_EVALUATION
