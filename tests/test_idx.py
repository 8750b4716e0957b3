"""IDX files and the MNIST family: hand-written bytes, the format's errors, class splits, EMNIST's transpose."""
import gzip
from pathlib import Path

import numpy as np
import pytest

from metamap import config as configlib
from metamap.data.idx import DEBIAN_FOLDERS, load_idx_family, read_idx, split_classes, write_idx
from metamap.errors import DataError
from metamap.registry import data_source


@pytest.fixture
def read_idx_bytes(tmp_path):
    def read(raw: bytes):
        path = tmp_path / "x-idx"
        path.write_bytes(raw)
        return read_idx(path)
    return read


@pytest.fixture(autouse=True)
def _fresh_cache():
    load_idx_family.cache_clear()
    yield
    load_idx_family.cache_clear()


def test_hand_written_bytes(read_idx_bytes):
    # ubyte vector [1, 2, 3]; big-endian int16 matrix [[1, -2], [256, 3]]
    assert read_idx_bytes(bytes([0, 0, 0x08, 1, 0, 0, 0, 3, 1, 2, 3])).tolist() == [1, 2, 3]
    raw = bytes([0, 0, 0x0B, 2, 0, 0, 0, 2, 0, 0, 0, 2]) + bytes([0, 1, 0xFF, 0xFE, 1, 0, 0, 3])
    m = read_idx_bytes(raw)
    assert m.dtype == np.int16 and m.tolist() == [[1, -2], [256, 3]]


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_round_trip(tmp_path, dtype, suffix):
    a = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    write_idx(tmp_path / f"a-idx{suffix}", a)
    b = read_idx(tmp_path / f"a-idx{suffix}")
    assert b.dtype == a.dtype and np.array_equal(a, b)


def test_wrong_magic_number(read_idx_bytes):
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx_bytes(bytes([0x1F, 0x8B, 8, 1, 0, 0, 0, 1, 5]))
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx_bytes(bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 5]))        # unknown type code
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx_bytes(b"")


def test_truncated_and_overlong(read_idx_bytes):
    with pytest.raises(DataError, match="truncated"):
        read_idx_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2]) + bytes(7))  # 8 values needed
    with pytest.raises(DataError, match="truncated IDX header"):
        read_idx_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 2]))
    with pytest.raises(DataError, match="longer than its header"):
        read_idx_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 2, 1, 2, 3]))


def test_damaged_gzip(tmp_path):
    path = tmp_path / "a-idx.gz"
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 4, 1, 2, 3, 4]))[:-6])
    with pytest.raises(DataError, match="a-idx.gz"):
        read_idx(path)


def write_family(folder: Path, classes=10, per_class=4, size=6, prefix="", test_part="t10k", offset=0,
                 transposed=False, seed=0):
    """Two parts of images whose first pixel row holds the class id (so labels can be checked)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for part, n in (("train", per_class), (test_part, per_class // 2)):
        labels = np.repeat(np.arange(classes), n)
        rng.shuffle(labels)
        images = rng.integers(0, 200, (len(labels), size, size)).astype(np.uint8)
        images[:, 0, :] = labels[:, None] * 10          # row 0 of the upright image carries the class
        if transposed:
            images = images.transpose(0, 2, 1)
        write_idx(folder / f"{prefix}{part}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}{part}-labels-idx1-ubyte", (labels + offset).astype(np.uint8))
    return folder


def test_mismatched_counts(tmp_path):
    folder = write_family(tmp_path / "m")
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(DataError, match="do not belong together"):
        load_idx_family("mnist", str(folder), image_size=6)


def test_labels_out_of_range(tmp_path):
    folder = write_family(tmp_path / "m")
    write_idx(folder / "train-labels-idx1-ubyte", np.full(40, 12, np.uint8))
    with pytest.raises(DataError, match="labels must lie in 0..9"):
        load_idx_family("mnist", str(folder), image_size=6)


def test_family_split_pools_parts_and_keeps_labels(tmp_path):
    folder = write_family(tmp_path / "fm")
    data = load_idx_family("fashionmnist", str(folder), image_size=6, fractions=(0.4, 0.2, 0.4))
    sizes = {k: d.num_classes for k, d in data.items()}
    assert sizes == {"train": 4, "val": 2, "test": 4}
    names = [n for d in data.values() for n in d.class_names]
    assert sorted(names) == sorted(set(names)) and len(names) == 10
    from metamap.data.idx import family
    all_names = family("fashionmnist").classes
    for d in data.values():
        assert d.class_counts().tolist() == [6] * d.num_classes      # 4 train + 2 test images each
        for c in range(d.num_classes):
            rows = d.data[d.indices_of(c), 0, 0, 0]
            assert set(rows.tolist()) == {10 * all_names.index(d.class_names[c])}
    # the split is a function of the names and the seed alone
    assert split_classes(list(all_names), [0.4, 0.2, 0.4], 0) == split_classes(list(all_names), [0.4, 0.2, 0.4], 0)
    assert split_classes(list(all_names), [0.4, 0.2, 0.4], 0) != split_classes(list(all_names), [0.4, 0.2, 0.4], 1)


def test_default_split_is_a_target_domain(tmp_path):
    folder = write_family(tmp_path / "k")
    cfg = configlib.resolve(overrides=["data.name=kmnist", f"data.path={str(folder)!r}", "data.image_size=6"])
    source = data_source(cfg)
    sizes = {s: source.dataset(cfg, s).num_classes for s in ("train", "val", "test")}
    assert sizes == {"train": 0, "val": 5, "test": 5}
    assert source.info(cfg).example_shape == (1, 6, 6)


def test_emnist_transposed_and_letters_offset(tmp_path):
    folder = write_family(tmp_path / "e", classes=26, prefix="emnist-letters-", test_part="test", offset=1,
                          transposed=True)
    data = load_idx_family("emnist", str(folder), image_size=6, fractions=(1, 0, 0), subset="letters")
    train = data["train"]
    assert train.num_classes == 26 and "Aa" in train.class_names
    c = train.class_names.index("Cc")
    assert set(train.data[train.indices_of(c), 0, 0, :].flatten().tolist()) == {20}   # upright again


def test_missing_files_name_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setitem(DEBIAN_FOLDERS, "fashionmnist", tmp_path / "nowhere")
    monkeypatch.setenv("METAMAP_DATA", str(tmp_path / "root"))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_idx_family("fashionmnist")


def test_resize(tmp_path):
    folder = write_family(tmp_path / "r", size=8)
    data = load_idx_family("mnist", str(folder), image_size=16, fractions=(1, 0, 0))
    assert data["train"].data.shape[1:] == (1, 16, 16)


@pytest.mark.skipif(not (DEBIAN_FOLDERS["fashionmnist"] / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_installed_fashion_mnist():
    data = load_idx_family("fashionmnist", "", "", 28, (0.0, 0.5, 0.5), 0, "balanced")
    assert sum(len(d) for d in data.values()) == 70000
    assert data["test"].class_counts().tolist() == [7000] * 5
