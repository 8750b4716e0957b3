"""The default data path end to end: CLI train/eval on the bundled Omniglot, predict on real PNGs."""
import csv
import zipfile
from pathlib import Path

import pytest

from metamap.cli import main

pytestmark = pytest.mark.integration      # CLI runs, training runs, processes

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


@pytest.fixture(scope="module")
def omniglot_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("omniglot") / "run"
    args = ["train", "--steps", "60", "--ways", "5", "--queries", "5", "--set", "model.hidden=32",
            "--set", "train.val_every=30", "--set", "train.val_episodes=20", "--set", "eval.ways=[5]",
            "--episodes", "30", "--lr", "0.003", "--run-dir", str(run), "-q"]
    assert main(args) == 0
    return run


def test_cli_train_and_eval_on_bundled_omniglot(omniglot_run, capsys):
    assert main(["eval", "--checkpoint", str(omniglot_run), "--episodes", "40", "-q"]) == 0
    out = capsys.readouterr().out
    assert "Omniglot lake split, test: evaluation alphabets (659 characters)" in out
    assert "5-way 1-shot, 15 queries/class" in out and "(40 episodes, seed 2024)" in out
    accuracy = float(out.split("5-way 1-shot, 15 queries/class: ")[1].split("%")[0])
    assert accuracy > 60.0       # chance is 20%; even 60 small batches learn a useful metric


@pytest.mark.skipif(not (SHARED / "images_evaluation.zip").exists(), reason="official archives not available")
def test_predict_on_real_omniglot_pngs(omniglot_run, tmp_path):
    # Five evaluation characters: drawing 1 as the support example, drawings 2-3 as queries,
    # straight from the official archive (105x105, 1-bit): predict must preprocess them itself.
    support, query = tmp_path / "support", tmp_path / "query"
    query.mkdir()
    truth = {}
    with zipfile.ZipFile(SHARED / "images_evaluation.zip") as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".png") and n.startswith("images_evaluation/Atlantean/"))
        by_char: dict[str, list[str]] = {}
        for n in names:
            by_char.setdefault(n.split("/")[2], []).append(n)
        for char in sorted(by_char)[:5]:
            files = by_char[char]
            (support / char).mkdir(parents=True)
            (support / char / "example.png").write_bytes(zf.read(files[0]))
            for f in files[1:3]:
                out_name = f"{char}-{Path(f).name}"
                (query / out_name).write_bytes(zf.read(f))
                truth[out_name] = char
    out = tmp_path / "pred.csv"
    assert main(["predict", "--checkpoint", str(omniglot_run), "--support", str(support), "--query", str(query),
                 "--out", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["file"] for r in rows) == sorted(truth)
    assert set(rows[0]) == {"file", "prediction", "score"}
    correct = sum(r["prediction"] == truth[r["file"]] for r in rows)
    assert correct >= 5, f"only {correct}/10 correct"     # chance: 2/10


def test_predict_errors(omniglot_run, tmp_path, capsys):
    (tmp_path / "support" / "only").mkdir(parents=True)
    (tmp_path / "query").mkdir()
    assert main(["predict", "-c", str(omniglot_run), "--support", str(tmp_path / "support"),
                 "--query", str(tmp_path / "query")]) == 2
    assert "at least two classes" in capsys.readouterr().err
    (tmp_path / "support" / "other").mkdir()
    for c in ("only", "other"):
        (tmp_path / "support" / c / "x.png").write_bytes(b"not a png at all")
    assert main(["predict", "-c", str(omniglot_run), "--support", str(tmp_path / "support"),
                 "--query", str(tmp_path / "query")]) == 2
    err = capsys.readouterr().err
    assert "x.png: cannot read this image" in err and "Traceback" not in err
