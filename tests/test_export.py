"""`metamap export`: a standalone ONNX classifier whose outputs equal the torch predictor's."""
from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from metamap.data.images import ImageSpec, list_images
from metamap.errors import DataError, ExportError, OutputError
from tests.learner_helpers import image_folder, learner

onnx = pytest.importorskip("onnx", reason="the export extra (onnx, onnxruntime) is not installed")
pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxruntime) is not installed")

from metamap.export import INPUT, OnnxClassifier, export_classifier, predict_onnx, session  # noqa: E402

SPEC = ImageSpec(size=16, mean=(0.5,), std=(0.25,))
# Every exportable family, and the options that change the exported graph's shape.
VARIANTS = [
    ("protonet",),
    ("matching", "learner.fce=true"),
    ("siamese", 'learner.loss="bce"'),
    ("relation",),
    ("finetune", 'learner.head="cosine"', 'learner.cosine_norm="per_class"', "learner.steps=10"),
    ("finetune", "learner.finetune_backbone=true", "learner.steps=3"),
    ("maml", "episode.ways=3"),                                  # transductive batch norm
    ("maml", "episode.ways=3", 'learner.bn="running"'),
    ("anil", "episode.ways=3"),
    ("metasgd", "episode.ways=3"),
    ("reptile", "episode.ways=3", "learner.inner_steps_eval=4"),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Images of 6 classes; support: 3 classes x 2 shots; query: 9 other images of those classes."""
    root = tmp_path_factory.mktemp("export")
    data = image_folder(root / "images", classes=6, per_class=5)
    support, query = root / "support", root / "query"
    query.mkdir()
    for c in range(3):
        (support / f"class{c}").mkdir(parents=True)
        for i in range(2):
            shutil.copy(data / f"class{c}" / f"{i}.png", support / f"class{c}" / f"{i}.png")
        for i in range(2, 5):
            shutil.copy(data / f"class{c}" / f"{i}.png", query / f"c{c}-{i}.png")
    return SimpleNamespace(data=data, support=support, query=query, root=root)


def support_tensors(folder: Path):
    from metamap.predict import read_support
    return read_support(folder, SPEC)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v).replace("learner.", ""))
def test_onnxruntime_equals_torch_on_the_same_images(variant, folders, tmp_path):
    name, *overrides = variant
    model = learner(name, *overrides, "data.image_size=16")
    model.eval()
    result = export_classifier(SimpleNamespace(learner=model, spec=SPEC), folders.support, tmp_path / "c.onnx")
    assert result.classes == ["class0", "class1", "class2"] and result.shots == [2, 2, 2]
    assert result.max_abs_diff < 1e-4
    support_x, support_y, _ = support_tensors(folders.support)
    with torch.set_grad_enabled(model.adapts_with_gradients):
        predictor = model.adapt(support_x, support_y, ways=3)   # the checkpoint's own backend and levers
    run = session(tmp_path / "c.onnx")
    images = SPEC.load_many(list_images(folders.query))
    for batch in (images, images[:1], images[2:6]):              # batches of any size
        with torch.no_grad():
            scores = predictor(SPEC.to_input(batch))
        got_scores, got_probs = run.run(None, {INPUT: batch.numpy()})
        assert got_scores.shape == (len(batch), 3)
        assert (torch.from_numpy(got_scores) - scores).abs().max() < 1e-4
        assert (torch.from_numpy(got_probs) - scores.softmax(-1)).abs().max() < 1e-4
    # The learner is as it was: evaluation mode, trainable weights.
    assert not model.training and all(p.requires_grad for p in model.parameters())


def test_metadata_names_classes_preprocessing_and_batch_dependence(folders, tmp_path):
    for name, dependent in (("protonet", False), ("maml", True)):
        model = learner(name, "episode.ways=3", "data.image_size=16").eval()
        export_classifier(SimpleNamespace(learner=model, spec=SPEC), folders.support, tmp_path / f"{name}.onnx")
        props = {p.key: p.value for p in onnx.load(str(tmp_path / f"{name}.onnx")).metadata_props}
        assert json.loads(props["metamap.classes"]) == ["class0", "class1", "class2"]
        assert json.loads(props["metamap.shots"]) == [2, 2, 2]
        assert ImageSpec.from_dict(json.loads(props["metamap.preprocessing"])) == SPEC
        assert "(v / 255 - mean) / std with mean [0.5] and std [0.25]" in props["metamap.preprocessing_steps"]
        assert "resized to 16x16 with Pillow's lanczos filter" in props["metamap.preprocessing_steps"]
        assert json.loads(props["metamap.batch_dependent"]) is dependent and props["metamap.learner"] == name
        read = OnnxClassifier.open(tmp_path / f"{name}.onnx")
        assert read.classes == ["class0", "class1", "class2"] and read.spec == SPEC


def train_checkpoint(folders, name: str, *overrides: str) -> Path:
    from metamap import config as configlib
    from metamap.train.run import train
    run = folders.root / f"run-{name}"
    config = configlib.resolve(None, [f'learner.name="{name}"', 'data.name="folder"', f'data.path="{folders.data}"',
                                      "data.image_size=16", "data.fractions=[0.5, 0.0, 0.5]", "model.hidden=8",
                                      "episode.ways=3", "episode.queries=2", "episode.tasks_per_batch=2",
                                      "train.steps=2", "train.val_every=0", "train.threads=1", *overrides])
    train(config, run, progress=False, run_test=False, echo=lambda *a, **k: None)
    return run


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.integration
@pytest.mark.parametrize("name", ["protonet", "maml"])
def test_predict_through_torch_and_onnx_gives_the_same_csv(name, folders, tmp_path, capsys):
    from metamap.cli import main
    run = train_checkpoint(folders, name)
    out = tmp_path / "classifier.onnx"
    assert main(["export", "--checkpoint", str(run), "--support", str(folders.support), "--out", str(out)]) == 0
    assert f"wrote {out}: {name}, 3 classes (class0, class1, class2)" in capsys.readouterr().out
    assert main(["predict", "--checkpoint", str(run), "--support", str(folders.support), "--query",
                 str(folders.query), "--out", str(tmp_path / "torch.csv")]) == 0
    torch_rows = read_csv(tmp_path / "torch.csv")
    onnx_rows = predict_onnx(out, folders.query)
    assert len(torch_rows) == 9
    assert [(r["file"], r["prediction"]) for r in torch_rows] == [(r.file, r.prediction) for r in onnx_rows]
    # Same files, same classes; the scores (6 decimals in the CSV) agree to rounding: the two
    # runtimes differ by ~1e-7, which can still move a sixth decimal by one.
    assert all(abs(float(r["score"]) - o.score) <= 1e-5 for r, o in zip(torch_rows, onnx_rows))


def test_refuses_what_is_not_a_plain_function_of_the_queries(folders, tmp_path):
    mann = learner("mann", "data.image_size=16").eval()
    with pytest.raises(ExportError, match="mann .*cannot be exported.*export supports the metric learners"):
        export_classifier(SimpleNamespace(learner=mann, spec=SPEC), folders.support, tmp_path / "m.onnx")
    serial = learner("maml", "episode.ways=3", "learner.transductive=false").eval()
    with pytest.raises(ExportError, match="learner.transductive = false"):
        export_classifier(SimpleNamespace(learner=serial, spec=SPEC), folders.support, tmp_path / "m.onnx")
    proto = learner("protonet").eval()
    with pytest.raises(DataError, match="not trained on images"):
        export_classifier(SimpleNamespace(learner=proto, spec=None), folders.support, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.integration
def test_output_path_and_missing_extra_are_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from metamap.cli import main
    missing = tmp_path / "no-such-checkpoint"          # would fail on loading: the checks come first
    with pytest.raises(OutputError, match="does not exist; create it first"):
        export_classifier(missing, tmp_path, tmp_path / "absent" / "c.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["export", "-c", str(missing), "--support", str(tmp_path), "--out", str(tmp_path / "c.onnx")]) == 2
    assert "pip install 'metamap[export]'" in capsys.readouterr().err
    assert not (tmp_path / "c.onnx").exists()


def test_reading_a_file_that_is_not_an_exported_classifier(tmp_path):
    (tmp_path / "x.onnx").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not an ONNX model"):
        OnnxClassifier.open(tmp_path / "x.onnx")
    plain = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(DataError, match="not a classifier written by `metamap export`"):
        OnnxClassifier.open(tmp_path / "plain.onnx")
    with pytest.raises(DataError, match="does not exist"):
        OnnxClassifier.open(tmp_path / "absent.onnx")


def test_the_readme_example_reads_the_classifier_with_onnxruntime_alone(folders, tmp_path, monkeypatch, capsys):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```python\n")[1:]]
    (example,) = [b for b in blocks if "metamap.preprocessing" in b]
    model = learner("protonet", "data.image_size=16").eval()
    export_classifier(SimpleNamespace(learner=model, spec=SPEC), folders.support, tmp_path / "classifier.onnx")
    query = list_images(folders.query)[4]
    shutil.copy(query, tmp_path / "query.png")
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    name, score = capsys.readouterr().out.split()
    (row,) = [r for r in predict_onnx(tmp_path / "classifier.onnx", folders.query) if r.file == query.name]
    assert name == row.prediction and abs(float(score) - row.score) < 1e-6
