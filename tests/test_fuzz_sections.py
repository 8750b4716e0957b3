"""benchmarks/fuzz.py at a small size: every section must end with no traceback and no silent accept,
and its oracles must tell a traceback and a silent accept from a clean outcome.
(The full runs and their counts are in RELIABILITY.md.)"""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fuzz():
    spec = importlib.util.spec_from_file_location("metamap_fuzz", ROOT / "benchmarks" / "fuzz.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def no_bug_or_silent(section, inputs):
    columns = section.columns()
    assert columns["inputs"] >= inputs, section.summary()
    assert columns["tracebacks"] == 0 and columns["silent accepts"] == 0, section.summary()
    assert columns["clean errors"] > 0, section.summary()       # the hostile inputs reached a refusal


@pytest.mark.parametrize("name,size", [("images", 300), ("modes", 100), ("metrics", 300), ("outputs", 200)])
def test_file_sections_end_clean(fuzz, name, size, tmp_path):
    section = getattr(fuzz, f"fuzz_{name}")(size, 1, tmp_path)
    no_bug_or_silent(section, size if name != "modes" else size // 2)


def test_config_and_adapt_sections_end_clean(fuzz):
    no_bug_or_silent(fuzz.fuzz_configs(150, 1), 150)
    no_bug_or_silent(fuzz.fuzz_adapt(70, 1), 70)


@pytest.mark.integration
def test_values_and_checkpoint_sections_end_clean(fuzz, tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "c").mkdir()
    no_bug_or_silent(fuzz.fuzz_values(40, 1, tmp_path / "v", ["protonet", "maml"]), 40)
    no_bug_or_silent(fuzz.fuzz_checkpoints(24, 1, tmp_path / "c"), 24)


def test_the_oracles_count_a_traceback_and_a_silent_accept(fuzz):
    section = fuzz.Section("probe")
    section.add("refused (clean)")
    try:
        {}["missing"]
    except KeyError:
        section.bug("a KeyError")
    section.add("SILENT", "a wrong value", "accepted")
    assert section.columns() == {"inputs": 3, "clean errors": 1, "correct results": 0, "tracebacks": 1,
                                 "silent accepts": 1}
    assert section.failed
    # An accepted value is suspicious next to its default when its type, sign, finiteness or size is off.
    assert fuzz.suspicious(1, 2.5) == "fraction for a whole number"
    assert fuzz.suspicious(0.1, float("nan")) == "non-finite number"
    assert fuzz.suspicious(3, -1) == "negative where the default is not"
    assert fuzz.suspicious(10, 10 ** 23) == "astronomical number"
    assert fuzz.suspicious(10, 12) == ""
    # The metrics oracle: a torn last line is no record; a damaged line is not a valid one.
    assert fuzz._valid_record('{"step": 3, "loss": 1}') == {"step": 3, "loss": 1}
    assert fuzz._valid_record('{"step": "3"}') is None and fuzz._valid_record('{"step": 4, "lo') is None
