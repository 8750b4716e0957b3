"""Fuzz runs of metamap's input handling, past parsing; every outcome is counted.

    python benchmarks/fuzz.py --seed 0                      # every section at its default size
    python benchmarks/fuzz.py --only values checkpoints --seed 1

Sections (the counts of each are printed; the run fails if any section has a BUG or a SILENT):
  images       random bytes, and real PNG/JPEG/GIF/BMP/TIFF/WebP files with byte flips, truncations,
               duplicated chunks -> ImageSpec.load
  modes        valid images of many modes and formats (float with NaN or inf pixels, LAB, CMYK, HSV,
               16- and 32-bit, palettes, transparency, 1x1 to 300x2 pixels) -> ImageSpec.load
  configs      random override strings -> config.resolve
  values       every config key of each learner set to each of a list of hostile values -> resolve, then
               the data source, learner, sampler, optimizer, one training step, one test episode,
               a checkpoint written and loaded
  checkpoints  checkpoint.json with keys removed, types changed, values edited, as found and re-signed
               -> metamap.load, adapt, predict, and resume with one training step
  metrics      metrics.jsonl torn, flipped, with lines inserted or removed -> the log reader, resume
  adapt        adapt() inputs of wrong shape, dtype, range, labels and ways -> adapt and its predictor
  outputs      output paths (missing folders, files as folders, folders as files, unwritable places,
               overlong names) -> the output checks, then the write itself

An outcome is the library's own error (a clean refusal), a result, a BUG (any other exception: a
traceback a user would see), or SILENT: an input the section's oracle knows to be wrong that was
accepted anyway. Run it on one thread; each process is capped (--memory-gb) so that a runaway
allocation is an error, not a machine out of memory.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from metamap.errors import ConfigError, DataError, MetamapError

BUG_REPORTS = 20           # tracebacks printed per section (all are counted)


COLUMNS = ("inputs", "clean errors", "correct results", "tracebacks", "silent accepts")


def column(outcome: str) -> str:
    """Which of the reported columns an outcome counts in ('' = not an input: nothing was tried)."""
    if outcome == "BUG":
        return "tracebacks"
    if outcome == "SILENT":
        return "silent accepts"
    if outcome.startswith("format cannot"):
        return ""
    return "clean errors" if outcome.startswith("refused") or outcome.endswith("Error") else "correct results"


class Section:
    """Counts outcomes; prints the first BUG and SILENT reports."""

    def __init__(self, name: str):
        self.name, self.counts, self.printed = name, Counter(), Counter()

    def add(self, outcome: str, what: str = "", detail: str = "") -> None:
        self.counts[outcome] += 1
        if outcome in ("BUG", "SILENT") and self.printed[outcome] < BUG_REPORTS:
            self.printed[outcome] += 1
            print(f"[{self.name}] {outcome} on {what}\n{detail}", file=sys.stderr, flush=True)

    def bug(self, what: str) -> None:
        self.add("BUG", what, traceback.format_exc(limit=6))

    @property
    def failed(self) -> bool:
        return bool(self.counts["BUG"] or self.counts["SILENT"])

    def columns(self) -> dict[str, int]:
        out = dict.fromkeys(COLUMNS, 0)
        for outcome, count in self.counts.items():
            if column(outcome):
                out[column(outcome)] += count
                out["inputs"] += count
        return out

    def summary(self) -> str:
        return f"{self.name}: {self.columns()} <- {dict(sorted(self.counts.items()))}"

    def row(self) -> str:
        return f"| {self.name} | " + " | ".join(f"{v:,}" for v in self.columns().values()) + " |"


# -- images ------------------------------------------------------------------------------------
def seed_images() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for mode, fmt in (("L", "PNG"), ("RGB", "JPEG"), ("P", "GIF"), ("RGB", "BMP"), ("RGBA", "PNG"), ("1", "PNG"),
                      ("I;16", "TIFF"), ("F", "TIFF"), ("RGB", "WEBP"), ("CMYK", "TIFF")):
        im = Image.fromarray(rng.integers(0, 256, (21, 17, 3), dtype=np.uint8), "RGB").convert(mode)
        buf = io.BytesIO()
        im.save(buf, fmt)
        out.append(buf.getvalue())
    return out


def mutate(rng: np.random.Generator, base: bytes) -> bytes:
    kind = rng.integers(4)
    if kind == 0:
        return rng.bytes(int(rng.integers(0, 400)))
    if kind == 1:
        return base[:int(rng.integers(0, len(base)))]
    blob = bytearray(base)
    if kind == 2:
        for _ in range(int(rng.integers(1, 10))):
            blob[int(rng.integers(len(blob)))] = int(rng.integers(256))
        return bytes(blob)
    a, b = sorted(rng.integers(0, len(blob), 2))
    return bytes(blob[:b] + blob[a:b] + blob[b:])


def checked_load(section: Section, spec, path: Path, what: str, must_refuse: bool = False) -> None:
    try:
        arr = spec.load(path)
    except DataError as e:
        section.add("DataError" if path.name in str(e) else "BUG", what, f"message without the file name: {e}")
        return
    except Exception:
        section.bug(what)
        return
    if arr.shape != spec.shape or arr.dtype != np.uint8:
        section.add("BUG", what, f"loaded as {arr.dtype} {arr.shape}")
    else:
        section.add("SILENT" if must_refuse else "loaded", what, "an image that must be refused was loaded")


def fuzz_images(n: int, seed: int, work: Path) -> Section:
    from metamap.data.images import ImageSpec
    section, rng, bases = Section("images"), np.random.default_rng(seed), seed_images()
    specs = [ImageSpec(size=8), ImageSpec(size=8, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)]
    path = work / "input.img"
    for _ in range(n):
        blob = mutate(rng, bases[int(rng.integers(len(bases)))])
        path.write_bytes(blob)
        checked_load(section, specs[int(rng.integers(2))], path, repr(blob[:48]))
    return section


def mode_image(rng: np.random.Generator, mode: str, size: tuple[int, int]) -> tuple[Image.Image, bool]:
    """A valid image of ``mode``; ``True`` if its pixels hold NaN or infinities (must be refused)."""
    w, h = size
    if mode == "F":
        arr = rng.normal(0, 1, (h, w)).astype(np.float32) * float(rng.choice([1, 1e-30, 1e30]))
        bad = rng.random() < 0.4
        if bad:
            arr.flat[int(rng.integers(arr.size))] = rng.choice([np.nan, np.inf, -np.inf])
        return Image.fromarray(arr, "F"), bad
    if mode in ("I", "I;16"):
        top = 2 ** 31 - 1 if mode == "I" else 65535
        dtype = np.int32 if mode == "I" else np.uint16
        return Image.fromarray(rng.integers(0, top, (h, w)).astype(dtype)), False      # I;16 or I
    if mode == "LAB":
        return Image.frombytes("LAB", (w, h), rng.integers(0, 256, (h, w, 3), dtype=np.uint8).tobytes()), False
    rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode == "P+transparency":
        im = rgba.convert("RGB").convert("P")
        im.info["transparency"] = 0
        return im, False
    return rgba.convert(mode), False


MODES = {"PNG": ["1", "L", "LA", "P", "P+transparency", "RGB", "RGBA", "I;16", "I"],
         "TIFF": ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "LAB", "F", "I;16", "I", "YCbCr"],
         "JPEG": ["L", "RGB", "CMYK", "YCbCr"], "WEBP": ["L", "RGB", "RGBA"], "BMP": ["1", "L", "P", "RGB"],
         "GIF": ["L", "P", "P+transparency"], "PPM": ["L", "RGB"]}


def fuzz_modes(n: int, seed: int, work: Path) -> Section:
    from metamap.data.images import ImageSpec
    section, rng = Section("modes"), np.random.default_rng(seed)
    pairs = [(fmt, mode) for fmt, modes in MODES.items() for mode in modes]
    specs = [ImageSpec(size=8), ImageSpec(size=8, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)]
    for i in range(n):
        fmt, mode = pairs[i % len(pairs)]
        size = (int(rng.integers(1, 40)), int(rng.integers(1, 40))) if rng.random() < 0.9 else (300, 2)
        im, bad = mode_image(rng, mode, size)
        path = work / f"m.{fmt.lower()}"
        try:
            im.save(path, fmt, **({"transparency": 0} if mode == "P+transparency" and fmt != "TIFF" else {}))
        except (OSError, ValueError, KeyError):
            section.add("format cannot store the mode")      # Pillow's writer refuses: nothing to load
            continue
        checked_load(section, specs[int(rng.integers(2))], path, f"{mode} {fmt} {size}", must_refuse=bad)
    return section


# -- config strings ----------------------------------------------------------------------------
def fuzz_configs(n: int, seed: int) -> Section:
    from metamap import config as configlib
    rng, section = np.random.default_rng(seed), Section("configs")
    keys = ["train.steps", "optim.lr", "episode.ways", "seed", "eval.ways", "data.split", "learner.name",
            "train", "nonsense.key", "model.hidden", "schedule.name", "a.b.c"]
    values = ["1", "-1", "0", "1e-3", "nan", "inf", "true", "[5, 20]", "[]", '"x"', "x", "", "{a=1}", "1.5", "'"]
    alphabet = list("abcdefghijklmnopqrstuvwxyz.=[]{}\"' 0123456789-+,")
    for _ in range(n):
        if rng.random() < 0.5:
            text = "".join(rng.choice(alphabet, int(rng.integers(0, 30))))
        else:
            text = f"{rng.choice(keys)}={rng.choice(values)}"
        try:
            configlib.resolve(overrides=[text])
            section.add("parsed")
        except ConfigError:
            section.add("ConfigError")
        except Exception:
            section.bug(repr(text))
    return section


# -- config values, through a training step -----------------------------------------------------
def make_folder(root: Path, classes: int = 10, per_class: int = 6, size: int = 20) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (size, size)).astype(float)
        for i in range(per_class):
            img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"class{c:02d}" / f"img{i}.png")
    return root


LEARNERS = ["protonet", "matching", "relation", "siamese", "finetune", "mann", "maml", "fomaml", "anil", "metasgd",
            "reptile"]
HOSTILE = ["abc", '""', "-1", "0", "1", "2", "0.5", "-5", "1e30", "nan", "inf", "-inf", "true", "false", "[]",
           "[1, 2]", "[nan, 1, 1]", "{a = 1}", "99999999999999999999999", "100000", "'lanczos'", "'sgd'", "[0]"]


def base_overrides(folder: Path, learner: str) -> list[str]:
    out = ["data.name='folder'", f"data.path='{folder}'", "data.fractions=[0.5, 0.2, 0.3]",
           *(["model.hidden=8"] if learner != "mann" else []),         # MANN's flatten backbone has no width
           f"learner.name='{learner}'", "episode.ways=3", "episode.shots=1", "episode.queries=2",
           "episode.tasks_per_batch=2", "eval.ways=[3]", "eval.shots=[1]", "eval.queries=2", "eval.episodes=2",
           "train.threads=1", "train.val_episodes=2", "train.tune_allocator=false"]
    if learner in ("maml", "fomaml", "anil", "metasgd", "reptile"):
        out.append("learner.cpp_kernels=false")       # no compiler runs inside the fuzzer
    return out


def leaf_keys(config: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in config.items():
        out += leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    return out


def lookup(config: dict, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def suspicious(default, value) -> str:
    """Why an accepted ``value`` looks wrong next to the key's default ('' if it does not)."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if isinstance(default, bool) != isinstance(value, bool):
        return "bool / non-bool"
    if number(default):
        if not number(value):
            return f"{type(value).__name__} for a number"
        if not math.isfinite(value):
            return "non-finite number"
        if isinstance(default, int) and not isinstance(value, int):
            return "fraction for a whole number"
        if default >= 0 > value:
            return "negative where the default is not"
        if abs(value) > 1e15 and abs(default) < 1e6:
            return "astronomical number"
    if isinstance(default, str) and not isinstance(value, str):
        return f"{type(value).__name__} for text"
    if isinstance(default, list) and not isinstance(value, list):
        return f"{type(value).__name__} for a list"
    return ""


# Keys whose values legitimately take several forms (the defaults show only one).
UNION_KEYS = {"train.chunk_tasks": ("auto",), "train.prefetch": ("auto", True, False), "eval.ways": (),
              "eval.shots": (), "train.precision": (), "learner.head": (), "model.hidden": (), "eval.finetune": (),
              "eval.finetune_lr": (), "eval.finetune_steps": ()}
# Limits for which any large number means "no limit" (as much as 0 or the default does).
NO_LIMIT_KEYS = {"train.max_weight_growth", "eval.cache_mb", "optim.grad_clip"}


def exercise(config: dict, work: Path) -> None:
    """What ``metamap train`` does with a config, at the smallest size: build, one step, one test
    episode, a checkpoint written and loaded. ``True`` if the step's loss and the test score are finite."""
    from metamap.train import checkpoint
    from metamap.train.run import build, check_step_memory, info_to_dict, test_samplers
    from metamap.train.runtime import pick_device
    from metamap.train.trainer import Trainer, prefetching

    device = pick_device(config["train"]["device"])
    source, info, learner = build(config)
    ep = config["episode"]
    sampler = source.sampler(config, "train", ep["ways"], ep["shots"], ep["queries"], ep["tasks_per_batch"],
                             config["seed"])
    samplers = test_samplers(config, source)
    check_step_memory(learner, info, config, sampler.tasks_per_batch, sampler.examples_per_task,
                      prefetch=prefetching(config["train"], device))
    meta = {"learner": config["learner"]["name"], "config": config, "data_info": info_to_dict(info)}
    trainer = Trainer(learner, sampler, config, work, meta, device=device, progress=False)
    try:
        work.mkdir(parents=True, exist_ok=True)
        record = trainer.train_step()
        from metamap.train.run import test
        result = test(learner, config, samplers[:1], device, progress=False, episodes=1)[0]
        trainer.save("last")
        checkpoint.load_learner(work / "last")
        return record is not None and math.isfinite(record["loss"]) and math.isfinite(result.mean)
    finally:
        if trainer._prefetch is not None:
            trainer._prefetch.shutdown(wait=True, cancel_futures=True)


CPU_PER_INPUT = 20.0         # CPU-seconds one input of the values section may take (a hang is a BUG)


class OutOfTime(Exception):
    pass


@contextlib.contextmanager
def cpu_budget(seconds: float):
    """Raise OutOfTime in this thread once the process has used ``seconds`` more CPU time."""
    def stop(*_):
        raise OutOfTime
    old = signal.signal(signal.SIGPROF, stop)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)


def fuzz_values(limit: int, seed: int, work: Path, learners: list[str]) -> Section:
    from metamap import config as configlib
    section, rng = Section("values"), np.random.default_rng(seed)
    folder = make_folder(work / "data")
    cases = []
    for learner in learners:
        base = base_overrides(folder, learner)
        config = configlib.resolve(overrides=base)
        for key in leaf_keys(config):
            cases += [(learner, base, key, lookup(config, key), value) for value in HOSTILE]
    order = rng.permutation(len(cases))[:limit] if limit else range(len(cases))
    with contextlib.chdir(work):        # values such as data.split_file = 'abc' name files relative to here
        return _run_values(section, cases, order, work)


def _run_values(section: Section, cases: list, order, work: Path) -> Section:
    from metamap import config as configlib
    from metamap.data.folder import load_folder
    slowest = []
    for i in order:
        learner, base, key, default, value = cases[i]
        what = f"{learner}: {key}={value}"
        if slowest and len(slowest) % 200 == 0:
            print(f"[values] {len(slowest)} of {len(order)} inputs", file=sys.stderr, flush=True)
        slowest.append((time.process_time(), what))
        run = work / "run"
        shutil.rmtree(run, ignore_errors=True)
        try:
            config = configlib.resolve(overrides=[*base, f"{key}={value}"])
        except ConfigError:
            section.add("refused at resolve")
            continue
        except Exception:
            section.bug(what)
            continue
        got = lookup(config, key)
        try:
            with warnings.catch_warnings(), cpu_budget(CPU_PER_INPUT):
                warnings.simplefilter("ignore")
                finite = exercise(config, run)
        except MetamapError:
            section.add("refused later (clean)", what)
            continue
        except OutOfTime:
            section.add("BUG", what, f"more than {CPU_PER_INPUT} CPU-seconds for one input: a user waits with no word")
            continue
        except Exception:
            section.bug(what)
            continue
        finally:
            load_folder.cache_clear()
        why = "" if key in UNION_KEYS else suspicious(default, got)
        if why == "astronomical number" and key in NO_LIMIT_KEYS:
            why = ""
        if not why and not finite:
            why = "a non-finite training loss or test score"
        section.add("SILENT" if why else "ran", what, f"accepted {got!r} ({why}; default {default!r})")
    stamps = [t for t, _ in slowest] + [time.process_time()]
    took = sorted(((b - a, w) for (a, w), b in zip(slowest, stamps[1:])), reverse=True)[:5]
    print("[values] most CPU: " + "; ".join(f"{w} {t:.2f} s" for t, w in took), file=sys.stderr, flush=True)
    return section


# -- checkpoint.json ---------------------------------------------------------------------------
def json_paths(node, prefix=()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += json_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += json_paths(v, (*prefix, i))
    return out


def edit_at(meta: dict, path: tuple, rng: np.random.Generator) -> dict:
    meta = copy.deepcopy(meta)
    parent = meta
    for p in path[:-1]:
        parent = parent[p]
    key, old = path[-1], parent[path[-1]]
    kind = int(rng.integers(5))
    if kind == 0 and isinstance(parent, dict):
        del parent[key]
    elif kind == 1:
        parent[key] = [None, "abc", 3, -1, 2.5, [], {}, True, "1", float("nan"), 10 ** 30][int(rng.integers(11))]
    elif kind == 2 and isinstance(old, (int, float)) and not isinstance(old, bool):
        parent[key] = old + float(rng.choice([1e-6, 1, -1])) if isinstance(old, float) else old + int(rng.choice([1, -1]))
    elif kind == 3 and isinstance(old, str):
        parent[key] = old[::-1] if old else "x"
    elif isinstance(parent, dict):
        parent[f"extra{int(rng.integers(100))}"] = 1
    else:
        parent[key] = None
    return meta


def fuzz_checkpoints(n: int, seed: int, work: Path) -> Section:
    import torch

    import metamap
    from metamap import config as configlib
    from metamap.train import checkpoint
    from metamap.train.run import train
    section, rng = Section("checkpoints"), np.random.default_rng(seed)
    folder = make_folder(work / "data")
    original = work / "original"
    config = configlib.resolve(overrides=base_overrides(folder, "protonet") + ["train.steps=1", "train.val_every=0",
                                                                              "train.report=false"])
    with contextlib.redirect_stdout(io.StringIO()):
        train(config, original, progress=False, run_test=False, echo=lambda *_: None)
    meta = json.loads((original / "last" / checkpoint.META).read_text())
    paths = json_paths(meta)
    x = torch.randn(6, 1, 28, 28)
    for i in range(n):
        path = paths[int(rng.integers(len(paths)))]
        edited = edit_at(meta, path, rng)
        signed = bool(rng.random() < 0.5)
        run = work / "run"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(original, run)
        last = run / "last"
        if signed:
            checkpoint.write_meta(last, edited)
        else:
            (last / checkpoint.META).write_text(json.dumps(edited, indent=2))
        changed = json.loads(json.dumps(edited)) != meta
        what = f"{'re-signed ' if signed else ''}edit at {'.'.join(map(str, path))}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                learner = metamap.load(last).learner
                with torch.set_grad_enabled(learner.adapts_with_gradients):
                    learner.adapt(x[:3], torch.tensor([0, 1, 2]))(x[3:])
                if i % 4 == 0:      # resume with one step: the optimizer and counters too
                    cfg = configlib.resolve(overrides=["train.steps=2"], base=json.loads((last / checkpoint.META)
                                                                                          .read_text())["config"])
                    train(cfg, resume=run, progress=False, run_test=False, echo=lambda *_: None)
        except MetamapError:
            section.add("refused (clean)")
            continue
        except Exception:
            section.bug(what)
            continue
        section.add("SILENT" if changed and not signed else "loaded", what,
                    f"an edit without its checksum was loaded: {json.dumps(edited)[:200]}")
    return section


# -- metrics.jsonl -----------------------------------------------------------------------------
def fuzz_metrics(n: int, seed: int, work: Path) -> Section:
    from metamap.metrics_log import read_log
    section, rng = Section("metrics"), np.random.default_rng(seed)
    good = [json.dumps({"step": s, "loss": 1.0 / s, "accuracy": 0.5}) for s in range(1, 9)]
    junk = ["[1, 2]", "5", '"x"', "{}", '{"step": "3"}', '{"step": -1}', '{"step": 2.5}', '{"step": true}', "{",
            '{"step": 3, "loss": NaN}', "\x00\x01", '{"step": 1e400}', "null", '{"step": 99999999999999999999}']
    log = work / "metrics.jsonl"
    for _ in range(n):
        lines = list(good)
        kind = int(rng.integers(4))
        if kind == 0:
            lines.insert(int(rng.integers(len(lines) + 1)), str(rng.choice(junk)))
        elif kind == 1 and lines:
            del lines[int(rng.integers(len(lines)))]
        text = "".join(line + "\n" for line in lines)
        if kind == 2:
            text = text[:int(rng.integers(len(text) + 1))]          # a kill in mid-write
        elif kind == 3:
            blob = bytearray(text.encode())
            blob[int(rng.integers(len(blob)))] = int(rng.integers(256))
            text = bytes(blob).decode("utf-8", errors="replace")
        log.write_text(text)
        # The oracle: every line but a last one cut short must be a record; then all of them are read.
        raw = text.split("\n")
        parsed = [(ln, _valid_record(ln)) for ln in raw if ln.strip()]
        torn = bool(parsed) and not text.endswith("\n") and parsed[-1][1] is None
        damaged = any(r is None for _, r in (parsed[:-1] if torn else parsed))
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = [r for _, r in read_log(log)]
        except MetamapError:
            section.add("refused (clean)" if damaged else "SILENT", text[:80], "a sound log was refused")
            continue
        except Exception:
            section.bug(repr(text[:80]))
            continue
        want = [r for _, r in (parsed[:-1] if torn else parsed)]
        if damaged or got != want or (torn and not caught):
            section.add("SILENT", repr(text[:120]), f"read {got} instead of refusing or {want}")
        else:
            section.add("read, torn last line left out with a warning" if torn else "read")
    return section


def _valid_record(line: str):
    try:
        r = json.loads(line)
    except (ValueError, RecursionError):
        return None
    ok = isinstance(r, dict) and isinstance(r.get("step"), int) and not isinstance(r.get("step"), bool)
    return r if ok and r["step"] >= 0 else None


# -- adapt() inputs ----------------------------------------------------------------------------
def adapt_learners():
    import torch

    from metamap import config as configlib
    from metamap.data.images import ImageSpec
    from metamap.registry import DataInfo, build_learner
    out = {}
    for name in ("protonet", "matching", "relation", "siamese", "finetune", "mann", "maml"):
        extra = ["learner.cpp_kernels=false", "episode.ways=3"] if name == "maml" else []
        width = [] if name == "mann" else ["model.hidden=4"]         # MANN's flatten backbone has no width
        config = configlib.resolve(overrides=[f"learner.name='{name}'", *width, *extra])
        torch.manual_seed(0)
        info = DataInfo((1, 28, 28), spec=ImageSpec(size=28), num_train_classes=5)
        learner = build_learner(config, info).eval()
        learner.spec = info.spec
        out[name] = learner
    return out


def random_input(rng: np.random.Generator):
    """A support set, labels, ways and a query, possibly wrong in one or more ways; and whether the
    whole is valid for a 1x28x28 float32 classifier (the oracle)."""
    import torch
    valid = True
    batched = rng.random() < 0.4
    tasks = int(rng.integers(1, 3))
    ways = int(rng.choice([2, 3, 3, 3]))
    shots = int(rng.integers(1, 3))
    labels = torch.arange(ways).repeat_interleave(shots)
    shape = [1, 28, 28]
    if rng.random() < 0.15:
        shape = [int(rng.choice([1, 2, 3])), int(rng.choice([5, 27, 28, 29])), int(rng.choice([5, 28]))]
        valid &= shape == [1, 28, 28]
    if rng.random() < 0.05:
        shape = shape[:int(rng.integers(0, 3))]
        valid = False
    n = len(labels)
    x = torch.randn(*([tasks] if batched else []), n, *shape)
    dtype = torch.float32
    if rng.random() < 0.15:
        dtype = [torch.uint8, torch.int64, torch.float16, torch.float64, torch.bool][int(rng.integers(5))]
        valid = False
    x = x.to(dtype) if dtype != torch.bool else x > 0
    if rng.random() < 0.08 and x.is_floating_point():
        x.view(-1)[int(rng.integers(x.numel()))] = float(rng.choice([np.nan, np.inf]))
        valid = False
    y = labels.clone()
    kind = rng.random()
    if kind < 0.06:
        y = y.float()
    elif kind < 0.12:
        y[int(rng.integers(len(y)))] = int(rng.choice([-1, ways, ways + 5]))
    elif kind < 0.16:
        y = torch.zeros_like(y)
    elif kind < 0.2:
        y = y[:-1]
    if batched:
        y = y.repeat(tasks, 1)
    given = None
    if rng.random() < 0.3:
        given = [ways, 1, 0, -2, ways + 1, 2.5, "x"][int(rng.integers(7))]
    valid &= labels_valid(y, given, n)
    if rng.random() < 0.04:
        x = x[..., :0, :, :, :] if x.dim() >= 4 else x
        y = y[..., :0]
        valid = False
    q_shape = list(x.shape[2:] if batched else x.shape[1:])
    if rng.random() < 0.1 and len(q_shape) == 3:
        q_shape[-1] = int(rng.choice([20, 28, 40]))
        valid &= q_shape[-1] == 28
    q = torch.randn(*([tasks if rng.random() < 0.9 else tasks + 1] if batched else []), 4, *q_shape)
    if batched and q.shape[0] != tasks:
        valid = False
    return x, y, given, q, valid


def labels_valid(y, given, n: int) -> bool:
    """Class labels 0..ways-1 covering every class of each task, one per example, ways >= 2."""
    import torch
    if y.is_floating_point() or y.dtype == torch.bool or y.shape[-1] != n or y.numel() == 0:
        return False
    if given is not None and (not isinstance(given, int) or isinstance(given, bool)):
        return False
    ways = given if given is not None else int(y.max()) + 1
    rows = y.reshape(-1, n)
    return ways >= 2 and int(y.min()) >= 0 and int(y.max()) < ways and all(
        set(row.tolist()) == set(range(ways)) for row in rows)


def fuzz_adapt(n: int, seed: int) -> Section:
    import torch
    section, rng = Section("adapt"), np.random.default_rng(seed)
    learners = adapt_learners()
    names = sorted(learners)
    for i in range(n):
        name = names[i % len(names)]
        learner = learners[name]
        x, y, ways, q, valid = random_input(rng)
        if name == "maml" and valid:        # its head has 3 outputs
            valid = (ways if ways is not None else int(y.max()) + 1) == 3
        if name == "mann" and ways is not None and isinstance(ways, int) and ways > learner.classes:
            valid = False
        what = f"{name}: support {x.dtype} {tuple(x.shape)}, labels {y.dtype} {y.tolist()[:8]}, ways {ways!r}, " \
               f"query {tuple(q.shape)}"
        try:
            with torch.set_grad_enabled(learner.adapts_with_gradients):
                out = learner.adapt(x, y, ways)(q)
        except MetamapError:
            if valid:
                section.add("SILENT", what, "a valid input was refused: " + traceback.format_exc(limit=1))
            else:
                section.add("refused (clean)", what)
            continue
        except Exception:
            section.bug(what)
            continue
        ok = bool(torch.isfinite(out).all()) and out.shape[-2] == 4
        section.add("ran" if valid and ok else "SILENT", what, f"accepted; output {tuple(out.shape)}")
    return section


# -- output paths ------------------------------------------------------------------------------
def fuzz_outputs(n: int, seed: int, work: Path) -> Section:
    from metamap.data.paths import check_output_file, check_writable_dir, write_text
    section, rng = Section("outputs"), np.random.default_rng(seed)
    (work / "afile").write_text("x")
    (work / "adir").mkdir(exist_ok=True)
    parts = ["afile", "adir", "missing", "new", "", ".", "..", "x" * 300, "line\nbreak", "sp ace", "über", "/proc",
             "/proc/self", "/dev/null", "/", "*"]
    for _ in range(n):
        pieces = [str(rng.choice(parts)) for _ in range(int(rng.integers(1, 4)))]
        path = Path(pieces[0]) if pieces[0].startswith("/") else work.joinpath(*pieces)
        path = path.joinpath(*pieces[1:]) if pieces[0].startswith("/") else path
        as_dir = bool(rng.random() < 0.5)
        what = f"{'folder' if as_dir else 'file'} {path}"
        try:
            check_writable_dir(path, "--run-dir") if as_dir else check_output_file(path, "--out")
        except MetamapError:
            section.add("refused (clean)")
            continue
        except Exception:
            section.bug(what)
            continue
        try:            # the check said yes: the write must work
            write_text(path / "probe.txt" if as_dir else path, "ok")
            section.add("written")
        except Exception as e:
            section.add("SILENT", what, f"checked, then the write failed: {e!r}")
        finally:
            if str(path).startswith(str(work)) and path != work:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() and path.name == "new" else None
    return section


# -- main --------------------------------------------------------------------------------------
SIZES = {"images": 20000, "modes": 3000, "configs": 20000, "values": 0, "checkpoints": 1000, "metrics": 5000,
         "adapt": 5000, "outputs": 2000}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=list(SIZES), help="sections to run (default: all)")
    for name, default in SIZES.items():
        p.add_argument(f"--{name}", type=int, default=default,
                       help=f"inputs of section {name} (values: 0 = every learner x key x hostile value)")
    p.add_argument("--learners", nargs="+", default=LEARNERS, help="learners of the values section")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-gb", type=float, default=8.0, help="address-space cap of this process")
    args = p.parse_args()
    import torch
    torch.set_num_threads(1)
    cap = int(args.memory_gb * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    sections = args.only or list(SIZES)
    results = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        for name in sections:
            size = getattr(args, name)
            (work / name).mkdir()
            run = {"images": lambda: fuzz_images(size, args.seed, work / name),
                   "modes": lambda: fuzz_modes(size, args.seed, work / name),
                   "configs": lambda: fuzz_configs(size, args.seed),
                   "values": lambda: fuzz_values(size, args.seed, work / name, args.learners),
                   "checkpoints": lambda: fuzz_checkpoints(size, args.seed, work / name),
                   "metrics": lambda: fuzz_metrics(size, args.seed, work / name),
                   "adapt": lambda: fuzz_adapt(size, args.seed),
                   "outputs": lambda: fuzz_outputs(size, args.seed, work / name)}[name]
            section = run()
            print(section.summary(), flush=True)
            results.append(section)
    print("\n| section | " + " | ".join(COLUMNS) + " |\n|---|" + "---:|" * len(COLUMNS))
    print("\n".join(s.row() for s in results), flush=True)
    sys.exit(1 if any(s.failed for s in results) else 0)


if __name__ == "__main__":
    main()
