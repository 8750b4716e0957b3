"""Where results go is checked before any work; files are replaced whole; CSV cells are never formulas."""
import csv
import os
import shutil
import subprocess

import pytest

from metamap.cli import csv_cell, main
from metamap.train.run import train
from tests.test_training import folder_config

pytestmark = pytest.mark.integration      # CLI runs, training runs, processes


@pytest.fixture(scope="module")
def run(image_folder, tmp_path_factory):
    run = tmp_path_factory.mktemp("out") / "run"
    train(folder_config(image_folder, steps=1, **{"train.val_every": 0, "train.report": "false",
                                                  "train.threads": 1}),
          run, progress=False, run_test=False, echo=lambda *_: None)
    return run


@pytest.fixture
def folders(image_folder, tmp_path):
    support, query = tmp_path / "support", tmp_path / "query"
    for c in ("class00", "+class01"):
        (support / c).mkdir(parents=True)
        shutil.copy(image_folder / c.lstrip("+") / "img0.png", support / c / "a.png")
    query.mkdir()
    for name in ("=cmd().png", "@x.png", "plain.png"):
        shutil.copy(image_folder / "class00" / "img1.png", query / name)
    return support, query


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if any prediction, evaluation or training starts."""
    def forbidden(*a, **k):
        raise AssertionError("work started before the output path was checked")
    for target in ("metamap.predict.predict_folders", "metamap.train.run.evaluate_checkpoint",
                   "metamap.train.run.build"):
        monkeypatch.setattr(target, forbidden)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder on a read-only mount (root ignores permission bits, so a mode of 0o555 is no test)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only file system here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def bad_outputs(tmp_path, read_only_dir):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-dir").mkdir()
    return {"missing folder": (tmp_path / "nowhere" / "p.csv", "does not exist; create it first"),
            "a directory": (tmp_path / "a-dir", "is a folder; give a file name"),
            "read-only": (read_only_dir / "p.csv", "cannot write in"),
            "under a file": (tmp_path / "a-file" / "p.csv", "does not exist")}


def test_predict_out_is_checked_before_predicting(run, folders, tmp_path, read_only_dir, no_work, capsys):
    support, query = folders
    for what, (out, message) in bad_outputs(tmp_path, read_only_dir).items():
        assert main(["predict", "-c", str(run), "--support", str(support), "--query", str(query),
                     "--out", str(out)]) == 2, what
        err = capsys.readouterr().err
        assert message in err and "--out" in err and "Traceback" not in err, (what, err)


def test_eval_json_is_checked_before_evaluating(run, tmp_path, read_only_dir, no_work, capsys):
    for what, (out, message) in bad_outputs(tmp_path, read_only_dir).items():
        assert main(["eval", "-c", str(run), "--json", str(out), "-q"]) == 2, what
        err = capsys.readouterr().err
        assert message in err and "--json" in err, (what, err)


def test_run_dir_is_checked_before_loading_data(image_folder, tmp_path, read_only_dir, no_work, capsys):
    (tmp_path / "a-file").write_text("x")
    cases = {"under a file": (tmp_path / "a-file" / "run", "is a file, not a folder"),
             "a file": (tmp_path / "a-file", "is a file, not a folder"),
             "read-only": (read_only_dir / "run", "cannot create the folder")}
    for what, (run_dir, message) in cases.items():
        assert main(["train", "--data", "folder", "--set", f"data.path={image_folder}", "--steps", "1", "-q",
                     "--run-dir", str(run_dir)]) == 2, what
        err = capsys.readouterr().err
        assert message in err and "--run-dir" in err and "Traceback" not in err, (what, err)


def test_csv_cells_that_a_spreadsheet_would_run_are_escaped(run, folders, tmp_path):
    support, query = folders
    out = tmp_path / "p.csv"
    assert main(["predict", "-c", str(run), "--support", str(support), "--query", str(query), "--out", str(out)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["file"] for r in rows) == ["'=cmd().png", "'@x.png", "plain.png"]
    assert {r["prediction"] for r in rows} <= {"class00", "'+class01"}
    assert [csv_cell(x) for x in ("-1", "\tx", "\rx", "a=b", "")] == ["'-1", "'\tx", "'\rx", "a=b", ""]


def test_a_failed_predict_leaves_an_earlier_output_whole(run, folders, tmp_path):
    support, query = folders
    out = tmp_path / "p.csv"
    out.write_text("earlier results\n")
    (query / "broken.png").write_bytes(b"not an image")
    assert main(["predict", "-c", str(run), "--support", str(support), "--query", str(query), "--out", str(out)]) == 2
    assert out.read_text() == "earlier results\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".p.csv")] == []


def test_resuming_a_run_on_a_read_only_mount_says_so(run, tmp_path, capsys):
    if os.geteuid() != 0:
        pytest.skip("needs a read-only mount (root only here)")
    view = tmp_path / "view"
    view.mkdir()
    if subprocess.run(["mount", "--bind", str(run), str(view)], capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount here")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount read-only here")
        assert main(["train", "--resume", str(view), "--steps", "2", "-q", "--no-test"]) == 2
        err = capsys.readouterr().err
        assert "cannot write in the run folder" in err and "resume that copy" in err and "Traceback" not in err
    finally:
        subprocess.run(["umount", str(view)], capture_output=True)
