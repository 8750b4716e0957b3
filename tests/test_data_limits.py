"""Data that cannot be used as asked is refused before work starts: too large for memory, or a split
that puts the same class in training and test."""
import json
import shutil

import pytest

from metamap.cli import main
from metamap.data import memory
from metamap.data.folder import load_folder
from metamap.errors import DataError

GB = 1000 ** 3


@pytest.fixture
def machine_with(monkeypatch):
    """Pretend that ``n`` bytes of memory are left (the estimate is what is tested, not this machine)."""
    def set_left(n):
        monkeypatch.setattr(memory, "available_bytes", lambda: n)
    return set_left


def test_available_memory_is_read_from_the_system():
    left = memory.available_bytes()
    assert left is None or 0 < left < 1 << 60
    assert memory.human(42_467_328_000) == "42.5 GB" and memory.human(999) == "999 bytes"


@pytest.mark.integration
def test_a_huge_omniglot_image_size_is_refused_with_the_estimate_before_decoding(machine_with, monkeypatch, capsys,
                                                                                 tmp_path):
    machine_with(16 * GB)

    def no_decoding(*a, **k):
        raise AssertionError("decoding started")
    monkeypatch.setattr("metamap.data.omniglot.load_omniglot_sets", no_decoding)
    assert main(["train", "--set", "data.image_size=512", "--steps", "1", "-q", "--no-test", "--run-dir",
                 str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()            # refused before anything was written: no folder left
    err = capsys.readouterr().err
    # 5 x 32,460 drawings x 512 x 512 bytes = 42.5 GB
    assert "Omniglot at data.image_size = 512" in err and "needs about 42.5 GB" in err
    assert "16.0 GB available" in err and "choose a smaller data.image_size" in err
    assert main(["train", "--set", "data.image_size=100000", "-q", "--run-dir", str(tmp_path / "r2")]) == 2
    assert "data.image_size must be a whole number from 4 to 512" in capsys.readouterr().err


def test_a_folder_too_large_for_memory_is_refused_before_reading(image_folder, machine_with, monkeypatch):
    machine_with(100_000_000)
    monkeypatch.setattr("metamap.data.images.ImageSpec.load", lambda *a: pytest.fail("an image was read"))
    load_folder.cache_clear()
    # 60 images x 1 x 2000 x 2000 = 240 MB > 80 % of 100 MB
    with pytest.raises(DataError, match=r"60 images at data.image_size = 2000 x 1 channel\(s\) needs about 240.0 MB"):
        load_folder(str(image_folder), 2000, 1, False, "lanczos", (0.5, 0.2, 0.3), 0, "error")
    with pytest.raises(Exception, match="data.image_size must be a whole number from 1 to 8000"):
        load_folder(str(image_folder), 100000, 1, False, "lanczos", (0.5, 0.2, 0.3), 0, "error")


@pytest.mark.integration
def test_a_training_pass_too_large_for_memory_is_refused_before_training(image_folder, tmp_path, machine_with,
                                                                        capsys):
    machine_with(1 * GB)
    code = main(["train", "--data", "folder", "--set", f"data.path={image_folder}", "--set", "data.image_size=1000",
                 "--set", "data.fractions=[0.5,0.2,0.3]", "--ways", "3", "--queries", "2", "--set", "model.hidden=8",
                 "--steps", "1", "-q", "--no-test", "--run-dir", str(tmp_path / "run2")])
    err = capsys.readouterr().err
    # inputs: 9 examples x 1000 x 1000 x 4 bytes, twice = 72 MB; the first convolution's outputs:
    # 9 x (3 outputs x 8 channels x 1000 x 1000 x 4 bytes) = 864 MB; 936 MB > 80 % of 1 GB
    assert code == 2, err
    assert "one training step (1 task(s) of 9 examples of 1x1000x1000, 1 task(s) per pass) needs about 936.0 MB" in err
    assert not (tmp_path / "run2" / "metrics.jsonl").exists()


def test_an_inner_mini_batch_larger_than_the_support_set_trains_on_the_whole_set_and_says_so(
        image_folder, tmp_path, machine_with, capsys):
    machine_with(4 * GB)
    code = main(["train", "--data", "folder", "--set", f"data.path={image_folder}", "--learner", "fomaml",
                 "--set", "data.fractions=[0.5,0.2,0.3]", "--ways", "3", "--queries", "2", "--set", "model.hidden=8",
                 "--set", "learner.inner_batch=100000", "--set", "learner.inner_batch_eval=100000",
                 "--set", "learner.cpp_kernels=false", "--set", "episode.tasks_per_batch=1",
                 "--set", "eval.ways=[3]", "--set", "eval.queries=2", "--set", "eval.episodes=2",
                 "--set", "train.val_every=0", "--set", "train.report=false",
                 "--steps", "1", "-q", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 0, err
    for key in ("inner_batch", "inner_batch_eval"):
        assert (f"metamap train: warning: learner.{key} = 100000 is more than the 3 support examples of a task: "
                f"each inner step uses all 3") in err
    assert "Traceback" not in err
    assert (tmp_path / "run" / "last").is_dir()


def test_a_meta_batch_too_large_for_memory_is_refused_before_a_task_is_drawn(image_folder, tmp_path, machine_with,
                                                                            monkeypatch, capsys):
    """MAML trains 8 tasks per pass, but the whole meta-batch is drawn at once: its inputs count."""
    machine_with(GB // 2)
    assert main(["train", "--learner", "maml", "--set", "episode.tasks_per_batch=100000", "-q", "--no-test",
                 "--run-dir", str(tmp_path / "run")]) == 2
    assert "episode.tasks_per_batch must be a whole number from 1 to 10000" in capsys.readouterr().err
    from metamap.tasks.sampler import EpisodeSampler
    monkeypatch.setattr(EpisodeSampler, "task_positions", lambda *a: pytest.fail("a task was drawn"))
    code = main(["train", "--data", "folder", "--set", f"data.path={image_folder}", "--learner", "maml",
                 "--set", "data.fractions=[0.5,0.2,0.3]", "--ways", "3", "--queries", "2", "--set", "model.hidden=8",
                 "--set", "learner.cpp_kernels=false", "--set", "episode.tasks_per_batch=10000",
                 "--steps", "1", "-q", "--no-test", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    # 10,000 tasks x 9 examples x 1 x 28 x 28 x 4 bytes, twice (564.5 MB), + 8 tasks' first convolution
    # outputs (5.4 MB) = 569.9 MB > 80 % of 500 MB
    assert code == 2, err
    assert ("one training step (10000 task(s) of 9 examples of 1x28x28, 8 task(s) per pass) needs about 569.9 MB "
            "of memory") in err
    assert "choose a smaller episode.tasks_per_batch" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_meta_batch_too_large_for_memory_is_refused_without_a_convolution(image_folder, tmp_path, machine_with,
                                                                            capsys):
    machine_with(1 * GB)
    code = main(["train", "--data", "folder", "--set", f"data.path={image_folder}", "--learner", "mann",
                 "--set", "data.fractions=[0.5,0.2,0.3]", "--ways", "3", "--queries", "2",
                 "--set", "episode.tasks_per_batch=10000", "--steps", "1", "-q", "--no-test",
                 "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    # MANN's flatten backbone: 10,000 tasks x 9 examples x 1 x 28 x 28 x 4 bytes = 282.2 MB of inputs, held
    # twice while drawn and once more as the pass's own input: 846.7 MB > 80 % of 1 GB
    assert code == 2, err
    assert "one training step (10000 task(s) of 9 examples of 1x28x28, 10000 task(s) per pass)" in err
    assert "needs about 846.7 MB" in err


def test_an_address_space_limit_counts_as_memory_left(monkeypatch):
    import resource
    size = memory._read_int("/proc/self/status", "VmSize")
    monkeypatch.setattr(resource, "getrlimit", lambda what: (size + GB, size + GB) if what == resource.RLIMIT_AS
                        else (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    left = memory.available_bytes()
    assert left is not None and left <= GB * 1.01       # the process grew a little since VmSize was read


@pytest.fixture
def folder(image_folder, tmp_path):
    return shutil.copytree(image_folder, tmp_path / "data")


@pytest.mark.integration
def test_a_split_file_with_a_class_in_train_and_test_is_refused(folder, capsys):
    split = {"train": ["class00", "class01", "class02", "class03", "class04", "class05"],
             "val": ["class06", "class07"], "test": ["class08", "class09", "class05"]}
    (folder / "metamap-split.json").write_text(json.dumps({"classes": split}))
    load_folder.cache_clear()
    assert main(["train", "--data", "folder", "--set", f"data.path={folder}", "--steps", "1", "-q", "--run-dir",
                 str(folder.parent / "run")]) == 2
    err = capsys.readouterr().err
    assert "puts 1 class(es) in more than one split (class05 in train and test)" in err
    assert "test classes must never be training classes" in err
    split["test"] = ["class08", "class09", "class09"]                   # twice in one list: as damaged
    (folder / "metamap-split.json").write_text(json.dumps({"classes": split}))
    load_folder.cache_clear()
    with pytest.raises(DataError, match="class09 in test and test"):
        load_folder(str(folder), 8, 1, False, "lanczos", (0.5, 0.2, 0.3), 0, "error")


def test_mini_imagenet_split_files_with_shared_classes_are_refused(tmp_path):
    from metamap.data.miniimagenet import load_miniimagenet
    (tmp_path / "images").mkdir()
    for part, labels in (("train", ["n01", "n02"]), ("val", ["n03"]), ("test", ["n04", "n01"])):
        rows = "".join(f"{part}{i}.jpg,{label}\n" for i, label in enumerate(labels))
        (tmp_path / f"{part}.csv").write_text("filename,label\n" + rows)
    with pytest.raises(DataError, match=r"puts 1 class\(es\) in more than one split \(n01 in train and test\)"):
        load_miniimagenet(tmp_path, split="files", cache=False)


@pytest.mark.integration
def test_a_model_too_large_for_memory_is_refused_before_its_weights_exist(image_folder, tmp_path, capsys,
                                                                          machine_with):
    machine_with(16 * GB)
    code = main(["train", "--data", "folder", "--set", f"data.path={image_folder}", "--set", "model.hidden=65536",
                 "--set", "data.fractions=[0.5,0.2,0.3]", "--ways", "3", "--steps", "1", "-q", "--no-test",
                 "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    # Conv-4 with 65,536 channels (the most model.hidden allows): 3 x 65,536^2 x 9 weights in its last
    # three convolutions alone
    assert code == 2 and "the protonet learner (115,966,017,540 weights" in err and "needs about 1.9 TB" in err


@pytest.fixture(scope="module")
def maml_run(image_folder, tmp_path_factory):
    run = tmp_path_factory.mktemp("maml") / "run"
    assert main(["train", "--data", "folder", "--set", f"data.path={image_folder}", "--learner", "maml",
                 "--set", "data.fractions=[0.5,0.2,0.3]", "--ways", "3", "--queries", "2", "--set", "model.hidden=8",
                 "--set", "learner.cpp_kernels=false", "--set", "episode.tasks_per_batch=1", "--set",
                 "train.val_every=0", "--set", "train.report=false", "--steps", "1", "-q", "--no-test",
                 "--run-dir", str(run)]) == 0
    return run


EVAL = ["--set", "eval.ways=[3]", "--set", "eval.queries=2", "--set", "eval.tasks_per_batch=1000",
        "--set", "eval.episodes=1000"]
# 1000 episodes x 9 examples x (2 x 1 x 28 x 28 x 4 bytes of inputs + 3 x 8 channels x 28 x 28 x 4 bytes kept
# for MAML's inner backward pass) = 733.8 MB > 80 % of 500 MB
EVAL_MESSAGE = ("evaluating 1000 episode(s) at a time (9 examples of 1x28x28 each) needs about 733.8 MB of memory, "
                "more than this machine can spare (500.0 MB available")


def test_an_evaluation_pass_too_large_for_memory_is_refused_before_any_episode(maml_run, machine_with, monkeypatch,
                                                                              capsys):
    machine_with(GB // 2)
    from metamap.tasks.sampler import EpisodeSampler
    monkeypatch.setattr(EpisodeSampler, "task_positions", lambda *a: pytest.fail("an episode was drawn"))
    assert main(["eval", "--checkpoint", str(maml_run), "-q", *EVAL]) == 2
    err = capsys.readouterr().err
    assert EVAL_MESSAGE in err and "choose a smaller eval.tasks_per_batch" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_training_whose_test_cannot_fit_is_refused_before_training(image_folder, tmp_path, machine_with, capsys):
    machine_with(GB // 2)
    code = main(["train", "--data", "folder", "--set", f"data.path={image_folder}", "--learner", "maml",
                 "--set", "data.fractions=[0.5,0.2,0.3]", "--ways", "3", "--queries", "2", "--set", "model.hidden=8",
                 "--set", "learner.cpp_kernels=false", "--set", "episode.tasks_per_batch=1", "--set",
                 "train.val_every=0", "--steps", "1", "-q", *EVAL, "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and EVAL_MESSAGE in err, err
    assert not (tmp_path / "run").exists()           # refused before a step was trained or anything written


def test_a_prototype_learner_encodes_a_bounded_batch_at_a_time_whatever_the_chunk(image_folder, machine_with):
    from metamap import config as configlib
    from metamap.train.evaluate import check_eval_memory
    from metamap.train.run import build, test_samplers
    config = configlib.resolve(overrides=["data.name='folder'", f"data.path='{image_folder}'",
                                          "data.fractions=[0.5,0.2,0.3]", "model.hidden=8", "eval.ways=[3]",
                                          "eval.queries=2"])
    source, _, learner = build(config)
    sampler = test_samplers(config, source)[0]
    machine_with(1000)
    check_eval_memory(learner, sampler, 10 ** 6, 10 ** 6)                    # codes cached: nothing to refuse
    assert learner.training                                                    # and its mode is left alone
    with pytest.raises(DataError, match=r"evaluating 1000000 episode\(s\) at a time \(9 examples of 1x28x28 each\) "
                                        r"needs about 56.4 GB"):        # per episode: 2 x 4 bytes x 784 x 9 x 10^6
        check_eval_memory(learner, sampler, 10 ** 6, 10 ** 6, cache_mb=0)
