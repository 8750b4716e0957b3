"""Config precedence: defaults < learner/data/backbone defaults < checkpoint config < file < overrides."""
import pytest

from metamap import config as configlib
from metamap.cli import FLAG_KEYS, build_parser, overrides_from


def test_precedence(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("seed = 5\n[train]\nsteps = 100\nlog_every = 7\n[model]\nhidden = 32\n")
    c = configlib.resolve(f, ["train.steps=200"], base={"train": {"steps": 50, "val_every": 9, "log_every": 3}})
    assert c["train"]["steps"] == 200            # override beats file
    assert c["train"]["log_every"] == 7          # file beats base
    assert c["train"]["val_every"] == 9          # base beats defaults
    assert c["seed"] == 5 and c["model"]["hidden"] == 32
    assert c["model"]["layers"] == 4             # the backbone's own default
    assert c["data"]["split"] == "lake"          # the data source's own default


def test_every_flag_is_an_override_of_its_key():
    parser = build_parser()
    values = {"learner": "protonet", "data": "omniglot", "split": "vinyals", "data_root": "/x", "steps": 3,
              "ways": 7, "shots": 2, "queries": 4, "meta_batch": 3, "lr": 0.01, "seed": 9, "device": "cpu",
              "threads": 1, "episodes": 650}
    argv = ["train"]
    for name, v in values.items():
        argv += ["--" + name.replace("_", "-"), str(v)]
    args = parser.parse_args(argv)
    config = configlib.resolve(overrides=overrides_from(args, list(FLAG_KEYS)))
    for name, v in values.items():
        section, _, key = FLAG_KEYS[name][0].rpartition(".")
        assert (config[section][key] if section else config[key]) == v, name


def test_set_beats_named_flag_and_values_parse_as_toml():
    args = build_parser().parse_args(["train", "--steps", "3", "--set", "train.steps=4", "--set", "eval.ways=[5, 20]",
                                      "--set", "data.split=vinyals"])
    c = configlib.resolve(overrides=overrides_from(args, list(FLAG_KEYS)))
    assert c["train"]["steps"] == 4 and c["eval"]["ways"] == [5, 20] and c["data"]["split"] == "vinyals"


def test_resolved_config_round_trips_through_toml(tmp_path):
    c = configlib.resolve(overrides=["eval.shots=[1, 5]", "optim.lr=0.002"])
    (tmp_path / "r.toml").write_text(configlib.dumps(c))
    assert configlib.resolve(tmp_path / "r.toml") == c


@pytest.mark.parametrize("path", sorted(__import__("pathlib").Path(__file__).parents[1].glob("configs/*.toml")))
def test_shipped_configs_resolve(path):
    configlib.resolve(path)
