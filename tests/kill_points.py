"""Stop a training run at one point of one checkpoint write: the machinery of the kill tests.

The steps of :func:`metamap.train.checkpoint.save` (tensor files, the JSON file, fsyncs, renames,
removals) are module functions. :func:`inject` wraps them so that the write of checkpoint
``name`` at ``step`` stops just before its ``index``-th step (``index = STEPS + 1``: right after
the write), or in the middle of it (``torn``: half the file written). The stop is a real SIGKILL
in a process started with ``python -m tests.kill_points``, or a :class:`Killed` exception in-process
(nothing of ``save`` runs after it either: it has no clean-up code).

    python -m tests.kill_points INDEX TORN NAME STEP -- train --run-dir R ...   # one real kill
    python -m tests.kill_points --sweep [last|best]                              # every point, real kills
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

from metamap.train import checkpoint

OPS = ("save_file", "_write_json", "_fsync", "_rename", "_remove")
# The steps of a save that replaces an existing checkpoint, in order.
STEPS = ("_remove tmp", "save_file weights", "save_file training", "_write_json meta", "_fsync weights",
         "_fsync training", "_fsync meta", "_fsync tmp", "_rename old", "_rename new", "_fsync parent",
         "_remove old")
TORN = {2: "weights", 3: "training", 4: "meta"}
POINTS = [(i, False) for i in range(1, len(STEPS) + 2)] + [(i, True) for i in TORN]


class Killed(BaseException):
    """The in-process stand-in for SIGKILL (a BaseException, so that no ``except Exception`` stops it)."""


def describe(index: int, torn: bool) -> str:
    if index > len(STEPS):
        return "after the write"
    return f"in the middle of {STEPS[index - 1]}" if torn else f"before {STEPS[index - 1]}"


@contextlib.contextmanager
def inject(index: int, torn: bool, name: str, step: int, action: str = "raise"):
    def stop():
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise Killed(describe(index, torn))

    state = {"armed": False, "count": 0}
    real = {op: getattr(checkpoint, op) for op in OPS}
    real_save = checkpoint.save

    def wrap(op):
        def run(*args, **kwargs):
            if not state["armed"]:
                return real[op](*args, **kwargs)
            state["count"] += 1
            if state["count"] == index:
                if torn:
                    real[op](*args, **kwargs)
                    file = Path(args[1] if op == "save_file" else args[0])
                    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
                stop()
            return real[op](*args, **kwargs)
        return run

    def save(path, learner, meta, *args, **kwargs):
        state["armed"] = Path(path).name == name and meta.get("step") == step
        try:
            out = real_save(path, learner, meta, *args, **kwargs)
        finally:
            armed, state["armed"] = state["armed"], False
        if armed and index > len(STEPS):
            stop()
        return out

    try:
        for op in OPS:
            setattr(checkpoint, op, wrap(op))
        checkpoint.save = save
        yield
    finally:
        for op, fn in real.items():
            setattr(checkpoint, op, fn)
        checkpoint.save = real_save


def sweep(name: str = "last") -> int:
    """Every kill point of one write of ``name`` (``last`` or ``best``), with a real SIGKILL, each followed
    by a resume; compared with one whole run (weights of last/ and best/, and the metrics log).

    ``last``: the write at step 10 that replaces step 5's. ``best``: validation every 2 steps, the
    write of best/ that replaces the first one (the step is read from the whole run's log)."""
    import json
    import subprocess
    import tempfile

    import torch
    from safetensors.torch import load_file

    from tests.conftest import _make_image_folder
    from tests.test_interrupt import train_cmd
    from tests.test_training import MACHINE_DEPENDENT

    def records(run):
        return [{k: v for k, v in json.loads(x).items() if k not in MACHINE_DEPENDENT}
                for x in (run / "metrics.jsonl").read_text().splitlines()]

    def command(run):
        cmd = train_cmd(folder, run, steps)
        if name == "best":      # validation episodes the 6 images per class can give
            cmd[cmd.index("train.val_every=0")] = "train.val_every=2"
            cmd[-2:-2] = ["--set", "eval.queries=2"]
        return cmd

    def same_weights(a, b, folder_name):
        x, y = load_file(a / folder_name / checkpoint.WEIGHTS), load_file(b / folder_name / checkpoint.WEIGHTS)
        return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    steps, failures = 12, 0
    with tempfile.TemporaryDirectory() as d:
        folder = _make_image_folder(Path(d) / "data")
        full = Path(d) / "full"
        subprocess.run(command(full), check=True, capture_output=True)
        if name == "last":
            step = 10
        else:
            bests = [r["step"] for r in records(full) if r.get("best") is True]
            if len(bests) < 2:
                print(f"the whole run wrote best/ {len(bests)} time(s); no replacing write to kill")
                return 1
            step = bests[1]
        print(f"kill points of the write of {name}/ at step {step} (of {steps}), each resumed:", flush=True)
        for index, torn in POINTS:
            run = Path(d) / f"k{index}{'t' if torn else ''}"
            cmd = command(run)
            killed = subprocess.run([sys.executable, "-m", "tests.kill_points", str(index), str(int(torn)), name,
                                     str(step), "--", *cmd[3:]], capture_output=True, text=True)
            left = sorted(p.name for p in run.iterdir() if p.name.startswith(f".{name}."))
            resumed = subprocess.run(cmd[:-2] + ["--resume", str(run)], capture_output=True, text=True)
            same = (resumed.returncode == 0 and same_weights(full, run, "last") and same_weights(full, run, "best")
                    and records(full) == records(run))
            clean = not any(p.name.startswith((".last.", ".best.")) for p in run.iterdir())
            ok = killed.returncode == -signal.SIGKILL and same and clean
            failures += not ok
            print(f"{describe(index, torn):32s} exit {killed.returncode:4d}  left {left or '-'}  resumed "
                  f"{'bit-identical' if same else 'DIFFERENT: ' + resumed.stderr[-300:]}"
                  f"{'' if clean else ', leftovers remain'}", flush=True)
    print(f"{len(POINTS)} kill points of {name}/, {len(POINTS) - failures} resumed bit-identical")
    return 1 if failures else 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--sweep"]:
        return sweep(*argv[1:2])
    index, torn, name, step = int(argv[0]), bool(int(argv[1])), argv[2], int(argv[3])
    args = argv[argv.index("--") + 1:]
    from metamap.cli import main as cli
    with inject(index, torn, name, step, action="kill"):
        return cli(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
