"""Typed options: every value is checked when the config resolves, plug-in defaults reach a
fixpoint, the resolved config is complete, and configs saved by older checkpoints still load."""
import dataclasses
import json
from pathlib import Path
from typing import Literal

import pytest
import torch

import metamap
from metamap import config as configlib
from metamap.errors import ConfigError
from metamap.options import ADAPTATION, ARCHITECTURE, ROLES, Options, field_names, option, roles
from metamap.registry import SELECTORS, DataInfo, build_learner, plugin, plugins
from metamap.train import checkpoint

OLD_CONFIGS = json.loads((Path(__file__).parent / "data" / "configs-3724a95.json").read_text())

# Issue 13, item 9: values that used to pass `config.resolve` and crash later.
FOLDER = ["data.name='folder'"]
CRASHED_LATER = {
    "schedule.gamma=abc": (["schedule.gamma=abc"], "schedule.gamma must be"),
    "optim.weight_decay=abc": (["optim.weight_decay=abc"], "optim.weight_decay must be a number from 0 to 1e+06"),
    "optim.weight_decay=-1": (["optim.weight_decay=-1"], "optim.weight_decay must be a number from 0 to 1e+06"),
    "optim.grad_clip=abc": (["optim.grad_clip=abc"], "optim.grad_clip must be a number >= 0"),
    "optim.momentum=abc": (["optim.name=sgd", "optim.momentum=abc"], "optim.momentum must be a number from 0 to 1"),
    "train.val_episodes=0": (["train.val_episodes=0"], "train.val_episodes must be a whole number >= 1"),
    "train.val_seed=-1": (["train.val_seed=-1"], "train.val_seed must be a whole number from 0 to"),
    "seed=huge": (["seed=99999999999999999999999"], "seed must be a whole number from 0 to 9223372036854775807"),
    "model.hidden=abc": (["model.hidden=abc"], "model.hidden must be a whole number from 1 to 65536"),
    "model.hidden=0": (["model.hidden=0"], "model.hidden must be a whole number from 1 to 65536"),
    "data.channels=2": (FOLDER + ["data.channels=2"], "data.channels must be 1 or 3"),
    "data.image_size=0": (FOLDER + ["data.image_size=0"], "data.image_size must be a whole number from 4 to 1024"),
    "data.image_size=abc": (FOLDER + ["data.image_size=abc"], "data.image_size must be a whole number from 4 to 1024"),
    "data.resample=foo": (FOLDER + ["data.resample=foo"], "data.resample must be lanczos, bilinear, bicubic, nearest or box"),
    "data.fractions=abc": (FOLDER + ["data.fractions=abc"], "data.fractions must be a list of 3 numbers >= 0"),
    "data.fractions=5": (FOLDER + ["data.fractions=5"], "data.fractions must be a list of 3 numbers >= 0"),
    "data.fractions=[nan,1,1]": (FOLDER + ["data.fractions=[nan,1,1]"],
                                 "data.fractions must be a list of 3 numbers >= 0"),
    "schedule.warmup=-5": (["schedule.warmup=-5"], "schedule.warmup must be a whole number >= 0"),
}


@pytest.mark.parametrize("name", list(CRASHED_LATER))
def test_bad_value_is_refused_at_resolve(name):
    overrides, message = CRASHED_LATER[name]
    with pytest.raises(ConfigError) as e:
        configlib.resolve(overrides=overrides)
    assert message in str(e.value) and "not " in str(e.value)


def test_non_utf8_config_file_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes("[train]\n# caf\xe9\nsteps = 3\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text.*save it as UTF-8 TOML"):
        configlib.resolve(path)


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="apply to optim.name = \"sgd\" only"):
        configlib.resolve(overrides=["optim.momentum=0.9"])
    with pytest.raises(ConfigError, match="needs optim.momentum > 0"):
        configlib.resolve(overrides=["optim.name=sgd", "optim.nesterov=true"])
    assert configlib.resolve(overrides=["optim.name=sgd", "optim.momentum=0.9", "optim.nesterov=true"])["optim"][
        "momentum"] == 0.9
    with pytest.raises(ConfigError, match="learner.pairs must be an even number"):
        configlib.resolve(overrides=["learner.name=siamese", "learner.pairs=7"])
    with pytest.raises(ConfigError, match=r"learner.heads \(9\) cannot exceed learner.slots \(8\)"):
        configlib.resolve(overrides=["learner.name=mann", "learner.heads=9", "learner.slots=8"])
    with pytest.raises(ConfigError, match="data.fractions must not all be 0"):
        configlib.resolve(overrides=FOLDER + ["data.fractions=[0, 0, 0]"])
    with pytest.raises(ConfigError, match=r"data.x_range \[1.0, 1.0\] is empty"):
        configlib.resolve(overrides=["data.name=sinusoid", "model.backbone=mlp", "data.x_range=[1, 1]"])
    with pytest.raises(ConfigError, match="train.device must be cpu, cuda, cuda:N or auto"):
        configlib.resolve(overrides=["train.device='cuda:x'"])


def test_types_are_exact():
    for bad in ("episode.ways=true", "episode.ways=2.0", "train.report=1", "optim.lr=inf", "optim.lr=nan",
                "eval.ways=[]", "eval.ways=[5, 0]", "data.rotations='yes'"):
        with pytest.raises(ConfigError, match="must be"):
            configlib.resolve(overrides=[bad])
    with pytest.raises(ConfigError, match="data.channels must be 1 or 3 .*, not true"):
        configlib.resolve(overrides=FOLDER + ["data.channels=true"])
    c = configlib.resolve(overrides=["optim.lr=1", "eval.ways=5", "train.chunk_tasks=4"])
    assert c["optim"]["lr"] == 1.0 and isinstance(c["optim"]["lr"], float)   # a whole number where a number goes
    assert c["eval"]["ways"] == [5]                                           # one number: a list of one
    assert c["train"]["chunk_tasks"] == 4


def test_resolved_config_holds_every_key_of_every_chosen_plugin():
    for name, entry in plugins("learner").items():
        c = configlib.resolve(overrides=[f"learner.name={name!r}"])
        assert list(c["learner"]) == ["name", *field_names(entry.options)], name
        assert list(c["model"]) == ["backbone", *field_names(plugin("model", c["model"]["backbone"]).options)]
        assert list(c["data"]) == ["name", *field_names(plugin("data", c["data"]["name"]).options)]
        for section, options in configlib.SECTIONS.items():
            assert list(c[section]) == field_names(options), section
    assert configlib.resolve(overrides=["learner.name='matching'"])["learner"] == {
        "name": "matching", "fce": False, "fce_steps": 5, "scale": 1.0}


def test_a_backbone_chosen_by_the_learner_brings_its_defaults():
    c = configlib.resolve(overrides=["learner.name='mann'"])
    assert c["model"] == {"backbone": "flatten", "scale": 0.2}
    assert c["episode"]["tasks_per_batch"] == 16                   # MANN's own defaults for other sections
    # The user's choice of backbone wins over the learner's, and brings its own defaults.
    c = configlib.resolve(overrides=["learner.name='mann'", "model.backbone='conv4'"])
    assert c["model"] == {"backbone": "conv4", "hidden": 64, "layers": 4, "norm": True, "unpooled": 0,
                          "feature_maps": False}
    with pytest.raises(ConfigError, match=r"unknown key\(s\) hidden in \[model\] \(model.backbone = 'flatten'\)"):
        configlib.resolve(overrides=["learner.name='mann'", "model.hidden=8"])


def test_variants_have_their_own_defaults_and_the_same_fields():
    maml, fomaml, reptile = (configlib.resolve(overrides=[f"learner.name={n}"])["learner"]
                             for n in ("maml", "fomaml", "reptile"))
    assert not maml["first_order"] and fomaml["first_order"]
    assert fomaml["zero_head"] and not maml["zero_head"]          # measured: BENCHMARKS "Paper reproductions"
    assert (reptile["inner_steps"], reptile["inner_steps_eval"], reptile["inner_lr"]) == (5, 50, 1e-3)   # its recipe
    assert list(maml) == list(fomaml) == list(reptile)


def test_every_field_has_a_role_and_roles_tell_adaptation_from_architecture():
    for kind in SELECTORS:
        for name, entry in plugins(kind).items():
            assert set(roles(entry.options).values()) <= set(ROLES), (kind, name)
    for options in configlib.SECTIONS.values():
        assert set(roles(options).values()) <= set(ROLES)
    gradient = roles(plugin("learner", "maml").options)
    assert gradient["inner_steps_eval"] == ADAPTATION and gradient["step_sizes"] == ARCHITECTURE
    assert roles(plugin("learner", "finetune").options)["steps"] == ADAPTATION
    # Same weights and buffers either way: eval may switch batch-norm modes, not the carried Adam state.
    assert gradient["bn"] == ADAPTATION and gradient["inner_state"] == ARCHITECTURE
    from metamap.train.eval_overrides import allowed_keys
    assert {"inner_steps_eval", "bn", "transductive", "backend"} <= allowed_keys("maml")
    assert not {"inner_steps", "step_sizes", "first_order", "inner_state"} & allowed_keys("maml")
    assert roles(plugin("model", "conv4").options)["hidden"] == ARCHITECTURE


@pytest.mark.parametrize("name", sorted(OLD_CONFIGS))
def test_configs_saved_by_older_checkpoints_take_todays_defaults(name):
    old = OLD_CONFIGS[name]
    resolved = configlib.resolve(base=old)
    overrides = [f"learner.name={old['learner']['name']!r}", f"data.name={old['data']['name']!r}",
                 f"model.backbone={old['model']['backbone']!r}"]
    # Missing keys take today's defaults; values the checkpoint recorded stay, even where the
    # default has changed since (train.precision was "fp32" then, "auto" now).
    assert old["train"]["precision"] == "fp32" and resolved["train"]["precision"] == "fp32"
    then = ["train.precision='fp32'"]
    if name == "reptile":
        # Reptile's defaults have become its paper's recipe since: what the checkpoint recorded stays.
        assert (resolved["learner"]["inner_lr"], resolved["optim"]["name"], resolved["schedule"]["name"]) == \
            (0.1, "adam", "constant")
        # Written before inner_state existed: no carried-state buffers, so "reset" (today's default: carried).
        assert resolved["learner"]["inner_state"] == "reset"
        then.append("learner.inner_state='reset'")
        then += [f"{sec}.{k}={json.dumps(v)}" for sec in ("learner", "optim", "schedule", "episode", "eval")
                 for k, v in old[sec].items() if (sec, k) not in (("learner", "name"), ("learner", "batched"),
                                                                  ("learner", "bf16"))]
    if "first_order" in old["learner"]:
        # Written before zero_head existed: trained without zeroing (first-order MAML's default since: zeroed).
        assert resolved["learner"]["zero_head"] is False
        then.append("learner.zero_head=false")
    assert resolved == configlib.resolve(overrides=[*overrides, *then])
    if name == "protonet":
        assert old["learner"] == {"name": "protonet"}
    if name == "matching":
        assert old["learner"] == {"name": "matching"} and resolved["learner"]["fce_steps"] == 5
    if name == "mann":                                                # unused conv4 keys were saved then
        assert "hidden" in old["model"] and resolved["model"] == {"backbone": "flatten", "scale": 0.2}


@pytest.mark.parametrize("name", ["protonet", "mann", "matching"])
def test_an_older_checkpoint_loads(name, tmp_path):
    old = OLD_CONFIGS[name]
    info = DataInfo(example_shape=(1, 28, 28), num_train_classes=10)
    torch.manual_seed(0)
    net = build_learner(configlib.resolve(base=old), info)
    info_d = {**dataclasses.asdict(info), "example_shape": [1, 28, 28], "spec": None}
    checkpoint.save(tmp_path / "ckpt", net, {"learner": name, "config": old, "data_info": info_d, "step": 3})
    loaded = metamap.load(tmp_path / "ckpt")
    assert loaded.config == configlib.resolve(base=old)
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.learner.state_dict()[k], v), k


def test_checkpoint_keys_of_another_learner_are_not_carried_over():
    old = OLD_CONFIGS["mann"]
    c = configlib.resolve(overrides=["learner.name='protonet'", "model.backbone='conv4'"], base=old)
    assert c["learner"] == {"name": "protonet"} and c["model"]["hidden"] == 64


def test_options_dataclasses_directly():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Demo(Options):
        section = "demo"
        n: int = option(3, low=1, high=10, doc="how many")
        mode: Literal["a", "b"] = option("a")
        sizes: list[int] | int = option([1, 2], low=0)
        rate: float = option(0.5, low=0, high=1, high_open=True)

    assert Demo().to_dict() == {"n": 3, "mode": "a", "sizes": [1, 2], "rate": 0.5}
    assert Demo(sizes=(4, 5), rate=0).sizes == [4, 5] and Demo(rate=0).rate == 0.0
    with pytest.raises(ConfigError, match=r"demo.n must be a whole number from 1 to 10 \(how many\), not 11"):
        Demo(n=11)
    with pytest.raises(ConfigError, match='demo.mode must be a or b, not "c"'):
        Demo(mode="c")
    with pytest.raises(ConfigError, match="demo.rate must be a number >= 0 and < 1, not 1"):
        Demo(rate=1)
    with pytest.raises(ConfigError, match="unknown config key 'demo.x'"):
        Demo.from_section({"x": 1})
    Fewer = Demo.with_defaults("Fewer", n=2)
    assert Fewer().n == 2 and issubclass(Fewer, Demo)
    with pytest.raises(ConfigError, match="demo.n must be a whole number from 1 to 10"):
        Fewer(n=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Demo().n = 4
