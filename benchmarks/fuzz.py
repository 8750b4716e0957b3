"""Fuzz runs of the image loader and the config parser; counts every outcome.

    python benchmarks/fuzz.py --images 5000 --configs 5000 --seed 0

Image inputs: random bytes, and real PNG/JPEG/GIF/BMP files with random byte flips, truncations
and chunk duplications. Config inputs: random printable strings and random key=value overrides.
An outcome other than "loaded"/"parsed" or the library's own error class is a bug, printed with
the input that caused it.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from metamap import config as configlib
from metamap.data.images import ImageSpec
from metamap.errors import ConfigError, DataError


def seeds_images() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for mode, fmt in (("L", "PNG"), ("RGB", "JPEG"), ("P", "GIF"), ("RGB", "BMP"), ("RGBA", "PNG"), ("1", "PNG")):
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


def fuzz_images(n: int, seed: int) -> Counter:
    rng, bases, spec = np.random.default_rng(seed), seeds_images(), ImageSpec(size=8)
    outcomes: Counter = Counter()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "input.img"
        for _ in range(n):
            blob = mutate(rng, bases[int(rng.integers(len(bases)))])
            path.write_bytes(blob)
            try:
                spec.load(path)
                outcomes["loaded"] += 1
            except DataError:
                outcomes["DataError"] += 1
            except Exception:
                outcomes["BUG"] += 1
                print("BUG on input", blob[:64], traceback.format_exc(), file=sys.stderr)
    return outcomes


def fuzz_configs(n: int, seed: int) -> Counter:
    rng = np.random.default_rng(seed)
    keys = ["train.steps", "optim.lr", "episode.ways", "seed", "eval.ways", "data.split", "learner.name",
            "train", "nonsense.key", "model.hidden", "schedule.name", "a.b.c"]
    values = ["1", "-1", "0", "1e-3", "nan", "inf", "true", "[5, 20]", "[]", '"x"', "x", "", "{a=1}", "1.5", "'"]
    alphabet = list("abcdefghijklmnopqrstuvwxyz.=[]{}\"' 0123456789-+,")
    outcomes: Counter = Counter()
    for _ in range(n):
        if rng.random() < 0.5:
            text = "".join(rng.choice(alphabet, int(rng.integers(0, 30))))
        else:
            text = f"{rng.choice(keys)}={rng.choice(values)}"
        try:
            configlib.resolve(overrides=[text])
            outcomes["parsed"] += 1
        except ConfigError:
            outcomes["ConfigError"] += 1
        except Exception:
            outcomes["BUG"] += 1
            print("BUG on input", repr(text), traceback.format_exc(), file=sys.stderr)
    return outcomes


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--configs", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    img, cfg = fuzz_images(args.images, args.seed), fuzz_configs(args.configs, args.seed)
    print(f"image loader: {args.images} inputs -> {dict(img)}")
    print(f"config overrides: {args.configs} inputs -> {dict(cfg)}")
    sys.exit(1 if img["BUG"] or cfg["BUG"] else 0)


if __name__ == "__main__":
    main()
