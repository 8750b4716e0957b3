"""benchmarks/reproduce.py takes its run folder as the CLI does: a new run never reuses a folder
holding an earlier one, and a resumed run needs one."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration      # other processes

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "reproduce" / "reptile-omniglot-5way1shot.toml"


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reproduce.py"), str(CONFIG), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_a_new_run_refuses_a_folder_holding_an_earlier_run(tmp_path):
    run = tmp_path / "reptile-omniglot-5way1shot"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    done = _run("--results", str(tmp_path))
    assert done.returncode == 2
    assert "already holds a run" in done.stderr and "delete it" in done.stderr
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_resuming_a_missing_run_is_a_clear_error(tmp_path):
    done = _run("--results", str(tmp_path), "--resume")
    assert done.returncode == 2
    assert "no such run folder" in done.stderr
