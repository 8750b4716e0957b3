"""Small builders shared by the tests of the metric, memory and baseline learners (issue 4)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metamap.config import resolve
from metamap.registry import DataInfo, build_learner
from metamap.tasks.batch import TaskBatch


def episode(tasks=2, ways=3, shots=1, queries=2, shape=(1, 16, 16), seed=0, classes=12) -> TaskBatch:
    """Random inputs with the sampler's class-major labels and random global class ids."""
    g = torch.Generator().manual_seed(seed)
    labels = lambda k: torch.arange(ways).repeat_interleave(k).expand(tasks, -1).clone()
    return TaskBatch(torch.randn(tasks, ways * shots, *shape, generator=g), labels(shots),
                     torch.randn(tasks, ways * queries, *shape, generator=g), labels(queries), ways,
                     torch.stack([torch.randperm(classes, generator=g)[:ways] for _ in range(tasks)]))


def small_backbone(name: str) -> list[str]:
    """Overrides that shrink the learner's backbone (MANN's flatten backbone has no size)."""
    return [] if name == "mann" else ["model.hidden=8"]


def learner(name: str, *overrides: str, shape=(1, 16, 16), classes=12, seed=0):
    """A learner built from the config, with weights from ``seed`` (as the trainer does)."""
    config = resolve(None, [f'learner.name="{name}"', *small_backbone(name), *overrides])
    torch.manual_seed(seed)
    return build_learner(config, DataInfo(shape, num_train_classes=classes))


def image_folder(root: Path, classes=15, per_class=4, size=16, seed=0) -> Path:
    """A tiny data set of random grey PNGs, one sub-folder per class, for end-to-end CLI runs."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        pattern = rng.integers(0, 256, (size, size))
        for i in range(per_class):
            noisy = np.clip(pattern + rng.normal(0, 30, (size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(root / f"class{c}" / f"{i}.png")
    return root


def cli_train_eval(tmp_path: Path, learner_name: str, *sets: str) -> tuple[Path, torch.nn.Module]:
    """Train 2 steps through ``metamap train`` on a tiny image folder, then ``eval``, ``predict``
    and ``metamap.load`` the result (its learner)."""
    import metamap
    from metamap.cli import main
    data = image_folder(tmp_path / "images")
    flags = ["--learner", learner_name, "--set", 'data.name="folder"', "--set", f'data.path="{data}"',
             "--set", "data.image_size=16", "--ways", "3", "--shots", "1",
             "--queries", "2", "--steps", "2", "--episodes", "3", "--set", "eval.ways=[3]", "--set", "eval.queries=2",
             "--set", "train.val_every=0", "--set", "train.log_every=1", "--quiet"]
    for s in [*small_backbone(learner_name), *sets]:
        flags += ["--set", s]
    run = tmp_path / "run"
    assert main(["train", *flags, "--run-dir", str(run)]) == 0
    assert main(["eval", "--checkpoint", str(run), "--episodes", "3", "--quiet"]) == 0
    # `metamap predict`: one labelled image for each of 3 classes, two images to classify.
    support, query = tmp_path / "support", tmp_path / "query"
    query.mkdir()
    for c in range(3):
        (support / f"c{c}").mkdir(parents=True)
        shutil.copy(data / f"class{c}" / "0.png", support / f"c{c}" / "0.png")
    for i in (1, 2):
        shutil.copy(data / f"class{i}" / "1.png", query / f"q{i}.png")
    out = tmp_path / "predictions.csv"
    assert main(["predict", "--checkpoint", str(run), "--support", str(support), "--query", str(query),
                 "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 3          # header + 2 predictions
    return run, metamap.load(run).learner
