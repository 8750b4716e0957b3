"""Your own image folder: split file written and reused, bad files refused or skipped, small classes named."""
import json
import shutil

import pytest

from metamap import config as configlib
from metamap.data.folder import load_folder
from metamap.errors import DataError, EpisodeError
from metamap.registry import data_source


def load(folder, **kw):
    load_folder.cache_clear()
    args = dict(image_size=8, channels=1, invert=False, resample="lanczos", fractions=(0.5, 0.2, 0.3),
                split_seed=0, on_bad_file="error", split_file="")
    args.update(kw)
    return load_folder(str(folder), **args)


@pytest.fixture
def folder(image_folder, tmp_path):
    return shutil.copytree(image_folder, tmp_path / "data")


def test_split_file_is_written_then_reused(folder):
    first = load(folder)
    record = json.loads((folder / "metamap-split.json").read_text())
    assert {k: len(v) for k, v in record["classes"].items()} == {"train": 5, "val": 2, "test": 3}
    assert first["test"].class_names == record["classes"]["test"]
    again = load(folder, split_seed=99)                         # another seed: the file still wins
    assert again["test"].class_names == first["test"].class_names
    assert not set(first["train"].class_names) & set(first["test"].class_names)


def test_new_class_not_in_split_file_is_named(folder):
    load(folder)
    shutil.copytree(folder / "class00", folder / "zebra")
    with pytest.raises(DataError, match="zebra"):
        load(folder)


def test_corrupt_files_refused_by_path_or_skipped(folder):
    (folder / "class03" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(DataError, match=r"broken.png.*on_bad_file"):
        load(folder)
    with pytest.warns(UserWarning, match="broken.png"):
        data = load(folder, on_bad_file="skip")
    assert sum(len(d) for d in data.values()) == 60


def test_mixed_sizes_and_modes_are_normalised(folder):
    from PIL import Image
    Image.new("RGB", (50, 13), (200, 10, 10)).save(folder / "class01" / "wide.jpg")
    Image.new("RGBA", (7, 7)).save(folder / "class01" / "alpha.png")
    data = load(folder)
    assert all(d.data.shape[1:] == (1, 8, 8) for d in data.values())


def test_classes_too_small_for_the_episode_are_named(folder):
    for p in list((folder / "class02").iterdir())[1:]:
        p.unlink()
    config = configlib.resolve(overrides=["data.name='folder'", f"data.path='{folder}'", "data.image_size=8",
                                          "data.fractions=[1.0, 0.0, 0.0]"])
    load_folder.cache_clear()
    with pytest.raises(EpisodeError, match=r"class02 \(1\)"):
        data_source(config).sampler(config, "train", 3, 1, 2, 1, 0)


def test_folder_without_classes_says_what_layout_is_needed(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "loose.png").write_bytes(b"")
    with pytest.raises(DataError, match="one sub-folder per class"):
        load(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        load(tmp_path / "nowhere")
