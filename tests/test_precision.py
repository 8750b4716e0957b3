"""train.precision = "auto": bf16 only where the hardware has it and the learner's accuracy allows."""
import pytest
import torch

from metamap import config as configlib
from metamap.algorithms.gradient import GradientLearner
from metamap.algorithms.protonet import PrototypicalNetwork
from metamap.errors import ConfigError
from metamap.nets import Conv4
from metamap.train.precision import cpu_flags, native_bf16, resolve_precision
from metamap.train.run import train
from tests.test_training import folder_config

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni
"""
AMX = {"avx512f", "amx_tile", "amx_bf16", "avx512_bf16"}
PLAIN = {"sse2", "avx2", "avx512f"}
CPU = torch.device("cpu")


def protonet():
    return PrototypicalNetwork(Conv4(hidden=4, image_size=8, layers=2), example_dims=3)


def maml():
    conv = Conv4(hidden=4, image_size=8, layers=2)
    return GradientLearner(conv, torch.nn.Linear(conv.out_features, 3), 3, ways=3)


def test_cpu_flags_are_read_from_cpuinfo():
    assert cpu_flags(CPUINFO) == {"fpu", "sse2", "avx2", "avx512f", "avx512_bf16", "avx512_vnni"}
    assert cpu_flags("processor : 0\n") == set()


def test_native_bf16_on_cpu_means_amx_or_avx512_bf16():
    assert native_bf16(CPU, cpu_flags(CPUINFO)) == "avx512_bf16"
    assert native_bf16(CPU, AMX) == "amx_bf16 and avx512_bf16"
    assert native_bf16(CPU, PLAIN) is None
    assert native_bf16(torch.device("meta"), AMX) is None


def test_auto_picks_bf16_only_with_native_bf16_and_a_learner_measured_unchanged():
    assert resolve_precision("auto", CPU, protonet(), AMX)[0] == "bf16"
    assert resolve_precision("auto", CPU, protonet(), cpu_flags(CPUINFO))[0] == "bf16"
    precision, why = resolve_precision("auto", CPU, protonet(), PLAIN)
    assert precision == "fp32" and "no native bf16" in why
    precision, why = resolve_precision("auto", CPU, maml(), AMX)     # MAML: meta-gradient moves in bf16
    assert precision == "fp32" and "maml" in why
    for explicit in ("fp32", "bf16"):                                # an explicit choice is kept
        assert resolve_precision(explicit, CPU, maml(), PLAIN)[0] == explicit
        assert resolve_precision(explicit, CPU, protonet(), AMX)[0] == explicit


def test_auto_follows_the_measured_default_experiments_of_the_metric_learners():
    from metamap.algorithms.matching import FullContextEmbedding, MatchingNetwork
    from metamap.algorithms.relation import RelationNetwork
    from metamap.algorithms.siamese import SiameseNetwork
    conv = Conv4(hidden=4, image_size=8, layers=2)
    assert resolve_precision("auto", CPU, MatchingNetwork(conv, 3), AMX)[0] == "bf16"
    fce = FullContextEmbedding(conv.out_features)
    assert resolve_precision("auto", CPU, MatchingNetwork(conv, 3, fce=fce), AMX)[0] == "fp32"
    assert resolve_precision("auto", CPU, SiameseNetwork(conv, 3, conv.out_features), AMX)[0] == "bf16"
    bce = SiameseNetwork(conv, 3, conv.out_features, loss="bce")
    assert resolve_precision("auto", CPU, bce, AMX)[0] == "fp32"
    assert resolve_precision("auto", CPU, SiameseNetwork(conv, 3, conv.out_features), PLAIN)[0] == "fp32"
    assert not getattr(RelationNetwork, "auto_bf16")       # 20-way 1.15 points lower in bf16


def test_auto_follows_the_measured_default_experiment_of_mann():
    from metamap.algorithms.mann import MemoryAugmentedNetwork
    mann = MemoryAugmentedNetwork(torch.nn.Flatten(), 3, 64, 3, hidden=8, slots=4, width=4, heads=1)
    assert resolve_precision("auto", CPU, mann, AMX)[0] == "bf16"
    assert resolve_precision("auto", CPU, mann, PLAIN)[0] == "fp32"


def test_auto_is_the_default_and_bad_values_are_refused():
    assert configlib.resolve()["train"]["precision"] == "auto"
    with pytest.raises(ConfigError, match="train.precision must be auto, fp32, bf16 or fp16"):
        configlib.resolve(overrides=["train.precision='half'"])


@pytest.mark.integration
def test_the_choice_is_printed_at_the_start(image_folder, tmp_path):
    lines = []
    train(folder_config(image_folder, steps=1), tmp_path / "run", progress=False, run_test=False,
          echo=lines.append)
    expected = resolve_precision("auto", CPU, protonet())
    assert lines[0] == f"precision: {expected[0]} ({expected[1]})"
