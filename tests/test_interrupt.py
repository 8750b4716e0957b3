"""Real processes: SIGTERM stops cleanly with a checkpoint; SIGKILL + --resume is bit-identical."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests import kill_points
from tests.test_training import MACHINE_DEPENDENT

pytestmark = pytest.mark.integration      # CLI runs, training runs, processes


def train_cmd(folder, run, steps):
    return [sys.executable, "-m", "metamap", "train", "--data", "folder", "--set", f"data.path={folder}",
            "--set", "data.fractions=[0.5,0.2,0.3]", "--steps", str(steps), "--ways", "3", "--queries", "2",
            "--set", "model.hidden=8", "--set", "train.val_every=0", "--set", "train.checkpoint_every=5",
            "--set", "train.log_every=1", "--set", "train.threads=1", "--no-test", "-q", "--run-dir", str(run)]


def wait_for_step(run, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        log = run / "metrics.jsonl"
        if log.exists() and any(json.loads(line).get("step", 0) >= step for line in log.read_text().splitlines()
                                if line.strip()):
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise AssertionError("training made no progress")


def weights(run):
    return load_file(run / "last" / "weights.safetensors")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_finish_the_step_and_checkpoint(image_folder, tmp_path, sig):
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(image_folder, run, 100000), stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    wait_for_step(run, 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig
    assert "resume with: metamap train --resume" in err and "Traceback" not in err
    meta = json.loads((run / "last" / "checkpoint.json").read_text())
    assert meta["step"] >= 3


def test_sigkill_then_resume_matches_an_uninterrupted_run(image_folder, tmp_path):
    steps = 24
    full = tmp_path / "full"
    subprocess.run(train_cmd(image_folder, full, steps), check=True, capture_output=True)
    run = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(image_folder, run, steps), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_step(run, 12, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((run / "last" / "checkpoint.json").read_text())["step"] < steps
    subprocess.run(train_cmd(image_folder, run, steps)[:-2] + ["--resume", str(run)], check=True,
                   capture_output=True)
    a, b = weights(full), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k not in MACHINE_DEPENDENT}
                       for x in (p / "metrics.jsonl").read_text().splitlines()]
    assert strip(full) == strip(run)


@pytest.fixture(scope="module")
def whole_12(image_folder, tmp_path_factory):
    run = tmp_path_factory.mktemp("whole") / "run"
    subprocess.run(train_cmd(image_folder, run, 12), check=True, capture_output=True)
    return run


def test_sigkill_between_the_renames_of_a_checkpoint_write_then_resume_is_bit_identical(image_folder, tmp_path,
                                                                                        whole_12):
    """A real SIGKILL at the worst point of replacing last/: the old one moved aside, the new one not yet in
    place (every point in-process: tests/test_checkpoint_safety.py; with real kills: python -m tests.kill_points
    --sweep)."""
    point = (kill_points.STEPS.index("_rename new") + 1, False)
    run = tmp_path / "run"
    cmd = train_cmd(image_folder, run, 12)
    killed = subprocess.run([sys.executable, "-m", "tests.kill_points", str(point[0]), str(int(point[1])), "last",
                             "10", "--", *cmd[3:]], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert any(p.name.startswith(".last.tmp-") for p in run.iterdir())        # the write was really cut
    subprocess.run(cmd[:-2] + ["--resume", str(run)], check=True, capture_output=True)
    a, b = weights(whole_12), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k not in MACHINE_DEPENDENT}
                       for x in (p / "metrics.jsonl").read_text().splitlines()]
    assert strip(whole_12) == strip(run)
    assert not any(p.name.startswith((".last.tmp", ".last.old")) for p in run.iterdir())
