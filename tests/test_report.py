"""Reports: curves, test-episode grid and HTML are produced, non-empty, and render in a browser."""
import re
import shutil
import subprocess

import pytest

from metamap.cli import main
from tests.test_training import folder_config

pytestmark = pytest.mark.integration      # CLI runs, training runs, processes


@pytest.fixture(scope="module")
def two_runs(image_folder, tmp_path_factory):
    from metamap.train.run import train
    root = tmp_path_factory.mktemp("runs")
    for name, lr in (("a", 1e-3), ("b", 3e-3)):
        train(folder_config(image_folder, steps=4, **{"optim.lr": lr}), root / name, progress=False,
              echo=lambda *_: None)
    return root / "a", root / "b"


def test_training_writes_the_report(two_runs):
    run = two_runs[0]
    for name in ("curves.png", "episodes.png", "report.html"):
        assert (run / name).stat().st_size > 1000, name
    page = (run / "report.html").read_text()
    assert 'src="curves.png"' in page and 'src="episodes.png"' in page
    assert re.search(r"3-way 1-shot, 2 queries/class</td><td>\d+\.\d\d% ± \d+\.\d\d%", page)
    assert "[train]" in page                       # the resolved config


def test_report_command_regenerates(two_runs, capsys):
    run = two_runs[1]
    for name in ("curves.png", "episodes.png", "report.html"):
        (run / name).unlink()
    assert main(["report", str(run)]) == 0
    assert all((run / n).exists() for n in ("curves.png", "episodes.png", "report.html"))
    assert main(["report", str(run.parent)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_compare_draws_runs_on_one_plot(two_runs, tmp_path, capsys):
    out = tmp_path / "cmp.png"
    assert main(["compare", *map(str, two_runs), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert out.stat().st_size > 1000
    assert "| a | protonet | 3-way 1-shot, 2 queries/class |" in table and "| b | protonet |" in table


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed")
def test_report_images_render_in_headless_chromium(two_runs, tmp_path):
    page = two_runs[0] / "report.html"
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert 'data-images-loaded="2"' in out.stdout, out.stderr[-2000:]
    assert 'data-images-expected="2"' in out.stdout
