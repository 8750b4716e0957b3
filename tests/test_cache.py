"""metamap.data.cache: decoded arrays on disk, used again only when made from the same key."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from metamap.data import cache
from metamap.data.paths import user_cache_dir


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def arrays(seed=0):
    g = np.random.default_rng(seed)
    return {"images": g.integers(0, 256, (3, 1, 4, 4), dtype=np.uint8), "labels": np.array([0, 1, 1])}


def counting(result):
    calls = []

    def build():
        calls.append(1)
        return result, {"names": ["a", "b"]}
    return build, calls


KEY = {"dataset": "toy", "spec": {"size": 4, "mean": (0.5,)}, "sources": {"x": [1, 2]}}


def test_an_entry_round_trips_memory_mapped_and_read_only_on_disk(tmp_path):
    folder = tmp_path / "entry"
    cache.write_entry(folder, KEY, arrays(), {"names": ["a", "b"]})
    assert sorted(p.name for p in folder.iterdir()) == ["images.npy", "labels.npy", "meta.json"]
    got, extra = cache.read_entry(folder, KEY)
    assert extra == {"names": ["a", "b"]} and got.keys() == {"images", "labels"}
    assert np.array_equal(got["images"], arrays()["images"]) and np.array_equal(got["labels"], [0, 1, 1])
    assert isinstance(got["images"], np.memmap)
    got["images"][0] = 7                                        # copy-on-write: the file keeps its bytes
    assert np.array_equal(cache.read_entry(folder, KEY)[0]["images"], arrays()["images"])
    assert not isinstance(cache.read_entry(folder, KEY, mmap=False)[0]["images"], np.memmap)


def test_another_key_or_a_damaged_entry_is_not_used(tmp_path):
    folder = tmp_path / "entry"
    cache.write_entry(folder, KEY, arrays())
    assert cache.read_entry(folder, {**KEY, "sources": {"x": [1, 3]}}) is None
    assert cache.read_entry(folder, {**KEY, "spec": {"size": 4, "mean": [0.5]}}) is not None   # tuple == list
    (folder / "labels.npy").write_bytes(b"\x93NUMPY broken")
    assert cache.read_entry(folder, KEY) is None
    (folder / "meta.json").write_text("{not json")
    assert cache.read_entry(folder, KEY) is None
    assert cache.read_entry(tmp_path / "nowhere", KEY) is None


def test_rewriting_an_entry_invalidates_it_before_replacing_its_arrays(tmp_path, monkeypatch):
    folder = tmp_path / "entry"
    cache.write_entry(folder, KEY, arrays(0))
    real = np.lib.format.write_array

    def crash(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(np.lib.format, "write_array", crash)
    with pytest.raises(OSError):
        cache.write_entry(folder, KEY, arrays(1))
    monkeypatch.setattr(np.lib.format, "write_array", real)
    assert cache.read_entry(folder, KEY) is None                # not the old key over half-new arrays


def test_cached_builds_once_then_reads(tmp_path):
    folders = cache.cache_folders(tmp_path / "data", "toy-4")
    assert folders[0] == tmp_path / "data" / "metamap-cache" / "toy-4"
    assert folders[1].parent == user_cache_dir() / "toy-4"
    build, calls = counting(arrays())
    first, extra = cache.cached(folders, KEY, build, "toy")
    second, extra2 = cache.cached(folders, KEY, build, "toy")
    assert len(calls) == 1 and extra == extra2 == {"names": ["a", "b"]}
    assert np.array_equal(first["images"], second["images"]) and isinstance(second["images"], np.memmap)
    cache.cached(folders, {**KEY, "sources": {"x": [9]}}, build, "toy")
    assert len(calls) == 2
    assert json.loads((folders[0] / "meta.json").read_text())["key"]["sources"] == {"x": [9]}


def test_an_invalid_entry_is_rebuilt(tmp_path):
    folders = [tmp_path / "entry"]
    build, calls = counting(arrays())
    cache.cached(folders, KEY, build, "toy")
    cache.cached(folders, KEY, build, "toy", valid=lambda a, extra: len(a["labels"]) == 4)
    assert len(calls) == 2


def test_falls_back_to_the_next_folder_and_warns_when_none_is_writable(tmp_path):
    blocked = tmp_path / "a-file"                # no folder can be made below a file (not even by root)
    blocked.write_bytes(b"")
    build, calls = counting(arrays())
    cache.cached([blocked / "entry", tmp_path / "rw"], KEY, build, "toy")
    assert (tmp_path / "rw" / "meta.json").is_file()
    with pytest.warns(UserWarning, match="could not write a toy cache to .*a-file/entry2; the data will be "
                                         "decoded again next time"):
        got, _ = cache.cached([blocked / "entry2"], KEY, build, "toy")
    assert np.array_equal(got["labels"], [0, 1, 1]) and len(calls) == 2


def test_fingerprint_changes_with_size_and_time(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(b"abc")
    os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    assert cache.fingerprint([f]) == {str(f.resolve()): [3, 1_000_000_000]}
    os.utime(f, ns=(2_000_000_000, 2_000_000_000))
    assert cache.fingerprint([f])[str(f.resolve())] == [3, 2_000_000_000]
    assert cache.fingerprint([tmp_path])[str(tmp_path.resolve())][0] == 0
