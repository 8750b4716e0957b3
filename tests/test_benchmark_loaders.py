"""Benchmark loaders on tiny synthetic files written in exactly the released formats.

Real data cannot be fetched here, so each test writes a few images per class in the layout and
pickle format of the real release (Python 2 pickles where the release is Python 2), then checks
what the loader makes of them, the shipped class splits, the errors, and the restricted unpickler.
"""
from __future__ import annotations

import csv
import io
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from metamap.cli import main
from metamap.data import safe_pickle, splits
from metamap.data.cifar import CIFAR_MEAN, load_cifar_benchmark, read_cifar100
from metamap.data.miniimagenet import IMAGENET_MEAN, load_miniimagenet
from metamap.data.tieredimagenet import load_tieredimagenet
from metamap.errors import ConfigError, DataError

# CIFAR-100's superclass of each fine class, in the archive's (alphabetical) fine-class order.
FINE_TO_COARSE = [4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13, 15, 3, 15,
                  0, 11, 1, 10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4,
                  18, 17, 10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13, 16, 19, 2, 4, 6, 19,
                  5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13]
MINI = splits.published("miniimagenet-ravi")


# -- writing files the way the releases were written ---------------------------------------------
class _Py2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2 wrote it: every string is a byte string (BINSTRING opcodes)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # numpy lived in numpy.core when these files were made.
    return buf.getvalue().replace(b"cnumpy._core.", b"cnumpy.core.")


def colour_image(rng, colour, size):
    """A noisy image of one colour (HWC uint8), so classes are learnable."""
    img = np.asarray(colour, dtype=float)[None, None, :] + rng.normal(0, 12, (*size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def class_colours(n, seed=0):
    return np.random.default_rng(seed).integers(20, 236, (n, 3))


def write_cifar100(root, per_class=(4, 2), seed=0, as_tar=True):
    """The CIFAR-100 python version: cifar-100-python/{meta,train,test} (+ the .tar.gz)."""
    fine_names = sorted(c for part in splits.published("cifarfs-bertinetto").values() for c in part)
    coarse_names = sorted(c for part in splits.published("fc100-oreshkin").values() for c in part)
    rng, colours = np.random.default_rng(seed), class_colours(100, seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    (folder / "meta").write_bytes(py2_pickle({"fine_label_names": fine_names, "coarse_label_names": coarse_names}))
    for name, n in (("train", per_class[0]), ("test", per_class[1])):
        fine = [c for c in range(100) for _ in range(n)]
        order = rng.permutation(len(fine))   # the archive is not sorted by class
        fine = [fine[i] for i in order]
        data = np.stack([colour_image(rng, colours[c], (32, 32)).transpose(2, 0, 1).reshape(-1) for c in fine])
        part = {"batch_label": f"{name} batch 1 of 1", "filenames": [f"img_{i}.png" for i in range(len(fine))],
                "fine_labels": fine, "coarse_labels": [FINE_TO_COARSE[c] for c in fine], "data": data}
        (folder / name).write_bytes(py2_pickle(part))
    (folder / "file.txt~").write_bytes(b"")
    if not as_tar:
        return folder
    archive = root / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-100-python")
    return archive


def jpeg(path, array):
    Image.fromarray(array).save(path, quality=95)


def write_mini_csv(root, classes_per_split=3, per_class=4, seed=0):
    """Ravi & Larochelle's layout: {train,val,test}.csv + images/<wnid><8-digit index>.jpg (any size)."""
    rng, colours = np.random.default_rng(seed), class_colours(60, seed)
    (root / "images").mkdir(parents=True)
    k = 0
    for part in ("train", "val", "test"):
        with open(root / f"{part}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["filename", "label"])
            for wnid in MINI[part][:classes_per_split]:
                for i in range(1, per_class + 1):
                    name = f"{wnid}{i:08d}.jpg"
                    jpeg(root / "images" / name, colour_image(rng, colours[k], (60 + 7 * i, 50 + 5 * i)))
                    w.writerow([name, wnid])
                k += 1
    return root


def write_mini_pickles(root, classes_per_split=3, per_class=4, val_name="val", seed=0, size=84):
    """The cache: mini-imagenet-cache-{split}.pkl = {"image_data": uint8 [N,84,84,3], "class_dict": {wnid: [i]}}."""
    rng, colours = np.random.default_rng(seed), class_colours(100, seed)
    root.mkdir(parents=True, exist_ok=True)
    k = 0
    for part in ("train", "val", "test"):
        images, class_dict = [], {}
        for wnid in MINI[part][:classes_per_split]:
            class_dict[wnid] = list(range(len(images), len(images) + per_class))
            images += [colour_image(rng, colours[k], (size, size)) for _ in range(per_class)]
            k += 1
        name = val_name if part == "val" else part
        with open(root / f"mini-imagenet-cache-{name}.pkl", "wb") as f:
            pickle.dump({"image_data": np.stack(images), "class_dict": class_dict}, f, protocol=4)
    return root


TIERED_COUNTS = {"train": 3, "val": 2, "test": 2}


def write_tiered(root, per_class=4, seed=0, npz_for=()):
    """Ren et al.'s release: {split}_images_png.pkl (list of PNG byte arrays, as cv2.imencode returns
    them) and {split}_labels.pkl (dict of label arrays and names), both Python 2 pickles."""
    rng, colours = np.random.default_rng(seed), class_colours(20, seed + 1)
    root.mkdir(parents=True, exist_ok=True)
    k, truth = 0, {}
    for part, n_classes in TIERED_COUNTS.items():
        pngs, specific, general, imgs = [], [], [], []
        for c in range(n_classes):
            for _ in range(per_class):
                img = colour_image(rng, colours[k], (84, 84))
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="PNG")
                pngs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8).reshape(-1, 1).copy())
                imgs.append(img)
                specific.append(c)
                general.append(c // 2)
            k += 1
        labels = {"label_specific": np.array(specific, dtype=np.int32),
                  "label_general": np.array(general, dtype=np.int32),
                  "label_specific_str": [f"{part} class {c}" for c in range(n_classes)],
                  "label_general_str": [f"{part} category {g}" for g in range(max(general) + 1)]}
        (root / f"{part}_labels.pkl").write_bytes(py2_pickle(labels))
        if part in npz_for:   # the reference code's decompressed form: OpenCV's BGR order
            np.savez(root / f"{part}_images.npz", images=np.stack(imgs)[..., ::-1])
        else:
            (root / f"{part}_images_png.pkl").write_bytes(py2_pickle(pngs))
        truth[part] = np.stack(imgs)
    return truth


@pytest.fixture(scope="module")
def cifar_archive(tmp_path_factory):
    return write_cifar100(tmp_path_factory.mktemp("cifar"))


# -- the shipped class splits ---------------------------------------------------------------------
def test_published_split_sizes_and_disjointness():
    assert splits.available() == ["cifarfs-bertinetto", "fc100-oreshkin", "miniimagenet-ravi", "omniglot-vinyals"]
    for name, sizes in (("miniimagenet-ravi", (64, 16, 20)), ("cifarfs-bertinetto", (64, 16, 20)),
                        ("fc100-oreshkin", (12, 4, 4)), ("omniglot-vinyals", (4112, 688, 1692))):
        s = splits.published(name)
        assert tuple(len(s[p]) for p in ("train", "val", "test")) == sizes, name
        everything = s["train"] + s["val"] + s["test"]
        assert len(set(everything)) == len(everything), f"{name}: a class is in two splits"
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in MINI["train"] + MINI["val"] + MINI["test"])
    # Spot checks against the released files: the first class of each split.
    assert (MINI["train"][0], MINI["val"][0], MINI["test"][0]) == ("n01532829", "n01855672", "n01930112")


def test_cifar_splits_cover_cifar100_and_fc100_fine_classes(cifar_archive):
    data = read_cifar100(cifar_archive)
    assert len(data.fine_names) == 100 and len(data.coarse_names) == 20
    fs = load_cifar_benchmark("cifarfs", cifar_archive)
    fc = load_cifar_benchmark("fc100", cifar_archive)
    assert [fs[p].num_classes for p in ("train", "val", "test")] == [64, 16, 20]
    assert [fc[p].num_classes for p in ("train", "val", "test")] == [60, 20, 20]
    assert sorted(sum((fs[p].class_names for p in fs), [])) == sorted(data.fine_names)
    assert sorted(sum((fc[p].class_names for p in fc), [])) == sorted(data.fine_names)
    # FC100's test superclasses are aquatic mammals, insects, medium mammals and people.
    assert set(fc["test"].class_names) == {
        "beaver", "dolphin", "otter", "seal", "whale", "bee", "beetle", "butterfly", "caterpillar", "cockroach",
        "fox", "porcupine", "possum", "raccoon", "skunk", "baby", "boy", "girl", "man", "woman"}
    assert fs["val"].class_names[:3] == ["beaver", "beetle", "butterfly"]


# -- CIFAR-FS / FC100 -----------------------------------------------------------------------------
def test_synthetic_cifar_matches_the_real_format(cifar_archive, tmp_path):
    # Read as people read the real files: pickle with encoding="bytes" gives byte-string keys.
    with tarfile.open(cifar_archive) as tar:
        raw = tar.extractfile("cifar-100-python/train").read()
    d = pickle.loads(raw, encoding="bytes")
    assert set(d) == {b"batch_label", b"filenames", b"fine_labels", b"coarse_labels", b"data"}
    assert d[b"data"].dtype == np.uint8 and d[b"data"].shape[1] == 3072


def test_cifarfs_images_labels_and_spec(cifar_archive):
    fs = load_cifar_benchmark("cifarfs", cifar_archive)
    train = fs["train"]
    assert train.data.dtype == torch.uint8 and train.example_shape == (3, 32, 32)
    assert (train.class_counts() == 6).all()                 # 4 from the train part + 2 from the test part
    assert train.spec.mean == CIFAR_MEAN and train.spec.size == 32
    assert "CIFAR-FS" in train.description and "64 classes" in train.description
    # Pixels are the archive's, channel planes intact: the class colour survives.
    data = read_cifar100(cifar_archive)
    apple = data.fine_names.index("apple")
    expected = data.images[data.fine == apple].astype(float).mean((0, 2, 3))
    got = train.data[train.indices_of(train.class_names.index("apple"))].float().mean((0, 2, 3)).numpy()
    assert np.allclose(got, expected, atol=1e-4)


def test_cifar_from_folder_and_parent_and_resized(cifar_archive, tmp_path):
    folder = write_cifar100(tmp_path / "plain", as_tar=False)
    a = load_cifar_benchmark("fc100", folder)
    b = load_cifar_benchmark("fc100", folder.parent)           # the folder holding cifar-100-python/
    assert torch.equal(a["val"].data, b["val"].data)
    big = load_cifar_benchmark("cifarfs", folder, image_size=40)
    assert big["test"].example_shape == (3, 40, 40)


def test_cifar_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.path"):
        load_cifar_benchmark("cifarfs", "")
    with pytest.raises(DataError, match="does not exist"):
        load_cifar_benchmark("cifarfs", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no CIFAR-100 python version"):
        load_cifar_benchmark("cifarfs", tmp_path / "empty")
    # CIFAR-10's python version has 'labels', not 'fine_labels'.
    c10 = tmp_path / "c10" / "cifar-100-python"
    c10.mkdir(parents=True)
    (c10 / "meta").write_bytes(py2_pickle({"label_names": ["cat"]}))
    (c10 / "train").write_bytes(py2_pickle({"data": np.zeros((1, 3072), np.uint8), "labels": [0]}))
    (c10 / "test").write_bytes(py2_pickle({"data": np.zeros((1, 3072), np.uint8), "labels": [0]}))
    with pytest.raises(DataError, match="fine_label_names"):
        load_cifar_benchmark("cifarfs", c10)
    bad_tar = tmp_path / "cifar-100-python.tar.gz"
    bad_tar.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="not a readable tar archive"):
        load_cifar_benchmark("cifarfs", bad_tar)


def test_hostile_cifar_tars_are_refused(tmp_path):
    """A tar whose member links elsewhere, escapes its folder or is far too large is refused whole."""
    def tar_with(name, extra):
        path = tmp_path / name / "cifar-100-python.tar.gz"
        path.parent.mkdir()
        with tarfile.open(path, "w:gz") as tar:
            for member in ("cifar-100-python/meta", "cifar-100-python/test"):
                info = tarfile.TarInfo(member)
                info.size = 1
                tar.addfile(info, io.BytesIO(b"x"))
            extra(tar)
        return path

    def link(tar):
        info = tarfile.TarInfo("cifar-100-python/train")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)

    def escaping(tar):
        info = tarfile.TarInfo("cifar-100-python/../../train")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))

    def missing(tar):
        pass
    for name, extra in (("link", link), ("escaping", escaping)):
        with pytest.raises(DataError, match="is a link or a path outside the archive's folder; refusing the "
                                            "archive: use the official cifar-100-python.tar.gz"):
            read_cifar100(tar_with(name, extra))
    with pytest.raises(DataError, match="has no cifar-100-python/train"):
        read_cifar100(tar_with("missing", missing))


# -- mini-ImageNet --------------------------------------------------------------------------------
def test_mini_csv_layout(tmp_path):
    root = write_mini_csv(tmp_path / "mini")
    with pytest.warns(UserWarning, match="split has 3 of the (64|16|20) published"):
        ds = load_miniimagenet(root)
    assert [ds[p].num_classes for p in ("train", "val", "test")] == [3, 3, 3]
    assert ds["train"].class_names == MINI["train"][:3] and ds["test"].class_names == MINI["test"][:3]
    assert ds["val"].example_shape == (3, 84, 84) and (ds["val"].class_counts() == 4).all()
    assert ds["train"].spec.mean == IMAGENET_MEAN
    # Same pixels as loading each JPEG with the spec (what `predict` does with a user's image).
    first = sorted((root / "images").glob(f"{MINI['train'][0]}*.jpg"))[0]
    assert np.array_equal(ds["train"].data[0].numpy(), ds["train"].spec.load(first))
    # The second load comes from the on-disk cache (memory-mapped) and is identical.
    assert (root / "metamap-cache").is_dir()
    with pytest.warns(UserWarning):
        again = load_miniimagenet(root)
    assert torch.equal(again["test"].data, ds["test"].data) and again["test"].class_names == ds["test"].class_names


def test_mini_pickle_layout_and_validation_name(tmp_path):
    root = write_mini_pickles(tmp_path / "mini", val_name="validation")
    with pytest.warns(UserWarning, match="published"):
        ds = load_miniimagenet(root, cache=False)
    assert ds["val"].class_names == MINI["val"][:3] and len(ds["val"]) == 12
    with open(root / "mini-imagenet-cache-train.pkl", "rb") as f:
        raw = pickle.load(f)["image_data"]
    assert np.array_equal(ds["train"].data.numpy(), raw.transpose(0, 3, 1, 2))   # HWC -> CHW, untouched at 84
    with pytest.warns(UserWarning):
        small = load_miniimagenet(root, image_size=32, cache=False)
    assert small["train"].example_shape == (3, 32, 32)


def test_mini_full_split_has_no_warning(tmp_path, recwarn):
    root = write_mini_pickles(tmp_path / "mini", classes_per_split=64, per_class=1, size=8)  # all classes
    ds = load_miniimagenet(root, image_size=8, cache=False)
    assert [ds[p].num_classes for p in ("train", "val", "test")] == [64, 16, 20]
    assert not [w for w in recwarn if "published" in str(w.message)]


def test_mini_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.path"):
        load_miniimagenet("")
    with pytest.raises(DataError, match="does not exist"):
        load_miniimagenet(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither mini-ImageNet layout"):
        load_miniimagenet(tmp_path / "empty")
    root = write_mini_csv(tmp_path / "mini", classes_per_split=2, per_class=2)
    # val and test files swapped: caught before any image is decoded.
    os.rename(root / "val.csv", root / "tmp.csv")
    os.rename(root / "test.csv", root / "val.csv")
    os.rename(root / "tmp.csv", root / "test.csv")
    with pytest.raises(DataError, match=r"n01930112 \(a test class\).*swapped"):
        load_miniimagenet(root)
    # The files' own split is accepted when asked for.
    assert load_miniimagenet(root, split="files", cache=False)["val"].class_names == MINI["test"][:2]
    next((root / "images").glob("*.jpg")).unlink()
    with pytest.raises(DataError, match="1 image.* missing"):
        load_miniimagenet(root, split="files", cache=False)
    (root / "train.csv").write_text("filename,class\nx.jpg,n01532829\n")
    with pytest.raises(DataError, match="header 'filename,label'"):
        load_miniimagenet(root, split="files")
    with pytest.raises(ConfigError, match="data.format"):
        load_miniimagenet(root, format="zip")
    pk = write_mini_pickles(tmp_path / "pk")
    (pk / "mini-imagenet-cache-test.pkl").unlink()
    with pytest.raises(DataError, match="mini-imagenet-cache-test.pkl"):
        load_miniimagenet(pk)
    with open(pk / "mini-imagenet-cache-test.pkl", "wb") as f:
        pickle.dump({"images": np.zeros((1, 84, 84, 3), np.uint8)}, f)
    with pytest.raises(DataError, match="'image_data' and 'class_dict'"):
        load_miniimagenet(pk, cache=False)


# -- tiered-ImageNet ------------------------------------------------------------------------------
def test_tiered_png_pickles(tmp_path):
    truth = write_tiered(tmp_path / "tiered")
    with pytest.warns(UserWarning, match="published one (351|97|160)"):
        ds = load_tieredimagenet(tmp_path / "tiered")
    assert {p: ds[p].num_classes for p in ds} == TIERED_COUNTS
    assert ds["train"].class_names == ["train class 0", "train class 1", "train class 2"]
    assert ds["test"].example_shape == (3, 84, 84) and ds["test"].spec.mean == IMAGENET_MEAN
    # PNG is lossless: the decoded pixels are exactly the written ones.
    assert np.array_equal(ds["val"].data.numpy(), truth["val"].transpose(0, 3, 1, 2))
    nested = tmp_path / "outer"          # data.path may be the folder holding tiered-imagenet/
    nested.mkdir()
    (tmp_path / "tiered").rename(nested / "tiered-imagenet")
    with pytest.warns(UserWarning, match="published"):
        small = load_tieredimagenet(nested, image_size=32, cache=False)
    assert small["train"].example_shape == (3, 32, 32)


def test_tiered_decompressed_npz_is_bgr(tmp_path):
    truth = write_tiered(tmp_path / "t", npz_for=("test",))
    with pytest.warns(UserWarning):
        ds = load_tieredimagenet(tmp_path / "t", cache=False)
    assert np.array_equal(ds["test"].data.numpy(), truth["test"].transpose(0, 3, 1, 2))


def test_tiered_errors(tmp_path):
    with pytest.raises(DataError, match="train_labels.pkl"):
        (tmp_path / "e").mkdir()
        load_tieredimagenet(tmp_path / "e")
    write_tiered(tmp_path / "t", per_class=2)
    (tmp_path / "t" / "val_labels.pkl").write_bytes(py2_pickle({"label_general": np.zeros(4, np.int32)}))
    with pytest.raises(DataError, match="label_specific"):
        load_tieredimagenet(tmp_path / "t", cache=False)
    labels = {"label_specific": np.zeros(3, np.int32), "label_specific_str": ["a"]}
    (tmp_path / "t" / "val_labels.pkl").write_bytes(py2_pickle(labels))
    with pytest.raises(DataError, match="4 images but val_labels.pkl 3 labels"):
        load_tieredimagenet(tmp_path / "t", cache=False)
    (tmp_path / "t" / "test_images_png.pkl").unlink()
    with pytest.raises(DataError, match="no test_images_png.pkl"):
        load_tieredimagenet(tmp_path / "t", cache=False)


# -- the restricted unpickler ---------------------------------------------------------------------
class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"image_data": _RunsACommand(marker)})
    with pytest.raises(safe_pickle.UnsafePickleError, match=r"(posix|nt)\.system"):
        safe_pickle.loads(evil)
    assert not marker.exists()
    for module, name in (("builtins", "eval"), ("builtins", "getattr"), ("numpy", "load"), ("subprocess", "run")):
        crafted = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X\x04\x00\x00\x00codeq\x00\x85q\x01Rq\x02."
        with pytest.raises(safe_pickle.UnsafePickleError, match=f"{module}.{name}"):
            safe_pickle.loads(crafted)
    # A booby-trapped data set file is refused by the loader, naming the file.
    root = write_mini_pickles(tmp_path / "mini", classes_per_split=1, per_class=1, size=8)
    (root / "mini-imagenet-cache-train.pkl").write_bytes(evil)
    with pytest.raises(DataError, match="mini-imagenet-cache-train.pkl: refused to load"):
        load_miniimagenet(root, cache=False)
    assert not marker.exists()


def test_restricted_unpickler_accepts_data_values():
    value = {"a": np.arange(6, dtype=np.int32).reshape(2, 3), "b": [1, 2.5, "x", b"y", (True, None)],
             "c": np.float32(3.0), "d": {1, 2}}
    for protocol in (2, 4, 5):
        back = safe_pickle.loads(pickle.dumps(value, protocol=protocol))
        assert np.array_equal(back["a"], value["a"]) and back["b"] == value["b"] and back["d"] == {1, 2}
    back = safe_pickle.loads(py2_pickle({"k": np.ones((2, 2), np.uint8), "names": ["x", "y"]}))
    assert back["names"] == ["x", "y"] and back["k"].sum() == 4
    with pytest.raises(DataError, match="damaged"):
        safe_pickle.loads(pickle.dumps(value)[:40])


# -- end to end -------------------------------------------------------------------------------------
@pytest.mark.integration
def test_cli_trains_protonet_resnet12_on_cifarfs(cifar_archive, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--data", "cifarfs", "--set", f"data.path='{cifar_archive}'",
            "--set", "model.backbone='resnet12'", "--set", "model.widths=[4, 4, 8, 8]",
            "--steps", "3", "--ways", "5", "--shots", "1", "--queries", "2",
            "--set", "train.val_every=2", "--set", "train.val_episodes=2", "--set", "train.log_every=1",
            "--set", "eval.ways=[5]", "--set", "eval.queries=2", "--episodes", "2",
            "--threads", "1", "--run-dir", str(run), "-q"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert 'backbone = "resnet12"' in out and 'name = "cifarfs"' in out
    assert "CIFAR-FS (Bertinetto et al. split), test: 20 classes" in out
    assert (run / "last").exists()


@pytest.mark.integration
def test_cli_names_the_missing_path(tmp_path, capsys):
    for name in ("miniimagenet", "tieredimagenet", "cifarfs", "fc100"):
        assert main(["train", "--data", name, "--steps", "1", "--run-dir", str(tmp_path / name), "-q"]) == 2
        err = capsys.readouterr().err
        assert "needs data.path" in err and "docs/datasets.md" in err, err
    assert main(["train", "--data", "cifarfs", "--set", f"data.path='{tmp_path / 'none'}'", "-q",
                 "--run-dir", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
