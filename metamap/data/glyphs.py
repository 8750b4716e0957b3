"""Printed glyphs: characters of many scripts rendered from the fonts installed on the machine.

A class is one character of one script; its examples are that character drawn in different
fonts (faces and weights), sizes, small rotations and shifts, all drawn from ``data.seed``.
Like Omniglot, classes are grouped by script and whole scripts form the splits
(``data.train_scripts``, ``data.val_scripts``, ``data.test_scripts``), so test characters
come from scripts never seen in training. Strokes are bright on a dark background, as
Omniglot's after inversion.

What makes a data set -- the characters, each font file with its Debian package and SHA-256,
the rendering parameters, Pillow's and FreeType's versions and the SHA-256 of the result -- is
recorded as the key of the rendered arrays' cache entry (``<cache>/glyphs/<digest>/meta.json``,
see :mod:`metamap.data.cache` and :func:`load_glyphs`), and the arrays are a function of exactly those: the same seed gives the
same data set on any machine with the same font files. A font that is not installed is an
error naming its Debian package.

Characters a font lacks are not drawn in it (each font's character map is read); a character
needs at least ``data.min_fonts`` fonts to become a class. Characters that render almost like
an earlier class (Latin ``A``, Greek ``Α`` and Cyrillic ``А``) are left out (``data.dedupe``).
"""
from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL import __version__ as PIL_VERSION

from metamap.data.cache import cached
from metamap.data.dataset import ClassDataset
from metamap.data.images import ImageSpec
from metamap.data.paths import user_cache_dir
from metamap.data.sources import ClassDataSource
from metamap.errors import ConfigError, DataError
from metamap.options import ARCHITECTURE, DATA, MAX_INT, RUNTIME, Options, option
from metamap.registry import register_data

FORMAT_VERSION = 1
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts")

# Debian package of each font file used below.
PACKAGES = {
    "DejaVuSans.ttf": "fonts-dejavu-core", "DejaVuSans-Bold.ttf": "fonts-dejavu-core",
    "DejaVuSerif.ttf": "fonts-dejavu-core", "DejaVuSerif-Bold.ttf": "fonts-dejavu-core",
    "DejaVuSansMono.ttf": "fonts-dejavu-core", "DejaVuSansMono-Bold.ttf": "fonts-dejavu-core",
    "DejaVuSansCondensed-Oblique.ttf": "fonts-dejavu-extra", "DejaVuSerif-Italic.ttf": "fonts-dejavu-extra",
    "DejaVuSans-ExtraLight.ttf": "fonts-dejavu-extra",
    "FreeSans.ttf": "fonts-freefont-ttf", "FreeSansBold.ttf": "fonts-freefont-ttf",
    "FreeSerif.ttf": "fonts-freefont-ttf", "FreeSerifBold.ttf": "fonts-freefont-ttf",
    "FreeMono.ttf": "fonts-freefont-ttf",
    "LiberationSans-Regular.ttf": "fonts-liberation2", "LiberationSerif-Bold.ttf": "fonts-liberation2",
    "LiberationMono-Regular.ttf": "fonts-liberation2",
    "NotoSansMono-Regular.ttf": "fonts-noto-mono",
}
NOTO = "fonts-noto-core"
LATIN_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
               "DejaVuSansMono.ttf", "DejaVuSansCondensed-Oblique.ttf", "DejaVuSerif-Italic.ttf",
               "DejaVuSans-ExtraLight.ttf", "FreeSans.ttf", "FreeSerifBold.ttf", "FreeMono.ttf",
               "LiberationSans-Regular.ttf", "LiberationSerif-Bold.ttf", "LiberationMono-Regular.ttf",
               "NotoSans-Regular.ttf", "NotoSerif-Bold.ttf", "NotoSansMono-Regular.ttf")
WIDE_FONTS = ("FreeSerif.ttf", "FreeSerifBold.ttf", "FreeSans.ttf", "FreeSansBold.ttf", "DejaVuSans.ttf",
              "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")


def noto(script: str, serif: bool = True, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Noto Sans (and Serif) regular and bold for ``script``, then ``extra`` files."""
    kinds = ("Sans", "Serif") if serif else ("Sans",)
    return tuple(f"Noto{k}{script}-{w}.ttf" for k in kinds for w in ("Regular", "Bold")) + extra


@dataclass(frozen=True)
class Script:
    ranges: tuple[tuple[int, int], ...]      # inclusive code point ranges
    fonts: tuple[str, ...]                   # font files tried for each character


SCRIPTS = {
    "latin": Script(((0x41, 0x5A), (0x61, 0x7A)), LATIN_FONTS),
    "greek": Script(((0x391, 0x3A9), (0x3B1, 0x3C9)), LATIN_FONTS),
    "cyrillic": Script(((0x410, 0x44F),), LATIN_FONTS),
    "hebrew": Script(((0x5D0, 0x5EA),), noto("Hebrew", extra=("NotoRashiHebrew-Regular.ttf",) + WIDE_FONTS)),
    "devanagari": Script(((0x905, 0x939),), noto("Devanagari", extra=WIDE_FONTS)),
    "bengali": Script(((0x985, 0x9B9),), noto("Bengali", extra=WIDE_FONTS)),
    "gurmukhi": Script(((0xA05, 0xA39),), noto("Gurmukhi", extra=WIDE_FONTS)),
    "gujarati": Script(((0xA85, 0xAB9),), noto("Gujarati", extra=WIDE_FONTS)),
    "kannada": Script(((0xC85, 0xCB9),), noto("Kannada", extra=WIDE_FONTS)),
    "telugu": Script(((0xC05, 0xC39),), noto("Telugu", extra=WIDE_FONTS)),
    "malayalam": Script(((0xD05, 0xD39),), noto("Malayalam", extra=WIDE_FONTS)),
    "sinhala": Script(((0xD85, 0xDC6),), noto("Sinhala", extra=WIDE_FONTS)),
    "khmer": Script(((0x1780, 0x17A2),), noto("Khmer", extra=WIDE_FONTS)),
    "lao": Script(((0xE81, 0xEAE),), noto("Lao", extra=("NotoLoopedLao-Regular.ttf",) + WIDE_FONTS)),
    "myanmar": Script(((0x1000, 0x102A),), noto("Myanmar", extra=WIDE_FONTS)),
    "canadian": Script(((0x1401, 0x1676),), noto("CanadianAboriginal", serif=False, extra=WIDE_FONTS)),
    "cherokee": Script(((0x13A0, 0x13F4),), noto("Cherokee", serif=False, extra=WIDE_FONTS)),
    "armenian": Script(((0x531, 0x556), (0x561, 0x586)), noto("Armenian", extra=WIDE_FONTS)),
    "georgian": Script(((0x10D0, 0x10FA),), noto("Georgian", extra=WIDE_FONTS)),
    "ethiopic": Script(((0x1200, 0x135A),), noto("Ethiopic", extra=WIDE_FONTS)),
    "thai": Script(((0xE01, 0xE2E),), noto("Thai", extra=("NotoLoopedThai-Regular.ttf", "NotoLoopedThai-Bold.ttf")
                                           + WIDE_FONTS)),
    "tamil": Script(((0xB85, 0xBB9),), noto("Tamil", extra=("NotoSerifTamilSlanted-Regular.ttf",) + WIDE_FONTS)),
    "tifinagh": Script(((0x2D30, 0x2D67),), tuple(f"NotoSansTifinagh{v}-Regular.ttf" for v in (
        "", "APT", "Adrar", "AgrawImazighen", "Ahaggar", "Air", "Azawagh", "Ghat", "Hawad", "RhissaIxa", "SIL",
        "Tawellemmet")) + WIDE_FONTS),
}
TRAIN_SCRIPTS = ["latin", "greek", "cyrillic", "hebrew", "devanagari", "bengali", "gurmukhi", "gujarati",
                 "kannada", "telugu", "malayalam", "sinhala", "lao", "myanmar"]
VAL_SCRIPTS = ["canadian", "cherokee", "khmer"]
TEST_SCRIPTS = ["armenian", "georgian", "ethiopic", "thai", "tamil", "tifinagh"]

# Rendering: the character is drawn at FONT_SIZE of a canvas ``OVERSAMPLE`` times the output
# size (smaller if its largest side would exceed FIT of the canvas), its em box centred
# (anchor "mm", so capitals and small letters keep their sizes), then
# scaled by a factor drawn from SCALES, rotated by up to ROTATION degrees and shifted by up to
# SHIFT of the canvas (rotation and shift times data.jitter) in one bilinear affine map, and
# reduced to the output size with a box filter.
OVERSAMPLE = 3
FONT_SIZE = 0.7
FIT = 0.85                 # largest side of a glyph at most this much of the canvas
SCALES = (0.8, 1.15)
ROTATION = 10.0
SHIFT = 0.06


def package_of(font: str) -> str:
    return PACKAGES.get(font, NOTO if font.startswith("Noto") else "a font package")


@lru_cache(maxsize=8)
def installed_fonts(extra_dirs: tuple[str, ...] = ()) -> dict[str, str]:
    """Font file name -> path, over the usual font folders (first found wins, folders sorted)."""
    found: dict[str, str] = {}
    for d in (*extra_dirs, *FONT_DIRS):
        root = Path(d).expanduser()
        if root.is_dir():
            for p in sorted(root.rglob("*")):
                if p.suffix.lower() in (".ttf", ".otf") and p.name not in found:
                    found[p.name] = str(p)
    return found


def find_fonts(names, extra_dirs: tuple[str, ...] = ()) -> dict[str, Path]:
    have = installed_fonts(tuple(extra_dirs))
    missing = [n for n in names if n not in have]
    if missing:
        packages = sorted({package_of(n) for n in missing})
        raise DataError(f"printed glyphs: font file(s) {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''} "
                        f"not installed; install the Debian package(s) {' '.join(packages)} "
                        f"(apt-get install {' '.join(packages)}), give their folder in data.font_dirs, or "
                        "leave out the scripts that need them")
    return {n: Path(have[n]) for n in names}


def font_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def coverage(path: Path) -> set[int]:
    """The code points a font file maps to glyphs."""
    from fontTools.ttLib import TTFont
    with TTFont(str(path), lazy=True) as f:
        return set(f.getBestCmap() or {})


def script_characters(script: Script, limit: int, seed: int) -> list[int]:
    """The script's letters (Unicode categories L*), at most ``limit`` of them (a keyed choice)."""
    points = [c for lo, hi in script.ranges for c in range(lo, hi + 1) if unicodedata.category(chr(c)).startswith("L")]
    if limit and len(points) > limit:
        key = lambda c: hashlib.sha256(f"glyphs:{seed}:{c}".encode()).hexdigest()
        points = sorted(sorted(points, key=key)[:limit])
    return points


@dataclass(frozen=True)
class Render:
    image_size: int = 28
    jitter: float = 1.0

    def glyph(self, font_path: Path, char: str) -> Image.Image:
        """The character in that font, its em box centred on the canvas, before any jitter."""
        canvas = self.image_size * OVERSAMPLE
        size = int(round(FONT_SIZE * canvas))
        left, top, right, bottom = _font(str(font_path), size).getbbox(char, anchor="mm")
        extent = max(right - left, bottom - top, 1)
        if extent > FIT * canvas:         # a wide glyph is made smaller rather than cut off
            size = max(4, int(size * FIT * canvas / extent))
        im = Image.new("L", (canvas, canvas), 0)
        ImageDraw.Draw(im).text((canvas / 2, canvas / 2), char, fill=255, font=_font(str(font_path), size),
                                anchor="mm")
        return im

    def draw(self, glyph: Image.Image, rng: np.random.Generator) -> np.ndarray:
        """One example from a :meth:`glyph`: ``uint8 [size, size]``, bright strokes on black."""
        canvas = glyph.size[0]
        scale = rng.uniform(*SCALES)
        angle = np.deg2rad(rng.uniform(-1, 1) * ROTATION * self.jitter)
        shift = rng.uniform(-1, 1, 2) * SHIFT * canvas * self.jitter
        # output pixel p comes from input pixel m + A^-1 (p - m - shift), A = scale * rotation, m the centre
        c, s = np.cos(angle) / scale, np.sin(angle) / scale
        m = canvas / 2
        ox, oy = m + shift
        coeffs = (c, s, m - c * ox - s * oy, -s, c, m + s * ox - c * oy)
        im = glyph.transform(glyph.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
        return np.asarray(im.resize((self.image_size, self.image_size), Image.Resampling.BOX), dtype=np.uint8)


@lru_cache(maxsize=256)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _correlations(reference: np.ndarray) -> np.ndarray:
    x = reference.reshape(len(reference), -1).astype(np.float64)
    x -= x.mean(1, keepdims=True)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9)
    return x @ x.T


def choose_classes(scripts: dict[str, list[int]], fonts: dict[str, Path], covered: dict[str, set[int]],
                   script_fonts: dict[str, tuple[str, ...]], min_fonts: int, dedupe: float, render: Render):
    """(script, code point, covering fonts) of each class, in script order, homoglyphs left out."""
    candidates = []
    for name, points in scripts.items():
        for c in points:
            have = [f for f in script_fonts[name] if c in covered[f]]
            if len(have) >= min_fonts:
                candidates.append((name, c, have))
    if dedupe < 1 and candidates:
        plain = Render(render.image_size, 0.0)
        reference = np.stack([_reference(plain, fonts[have[0]], chr(c)) for _, c, have in candidates])
        corr = _correlations(reference)
        kept: list[int] = []
        for i in range(len(candidates)):
            if not kept or corr[i, kept].max() < dedupe:
                kept.append(i)
        candidates = [candidates[i] for i in kept]
    return candidates


def _reference(render: Render, font: Path, char: str) -> np.ndarray:
    im = render.glyph(font, char)
    return np.asarray(im.resize((render.image_size, render.image_size), Image.Resampling.BOX))


def render_classes(classes, fonts: dict[str, Path], examples: int, seed: int, render: Render) -> np.ndarray:
    """``uint8 [classes, examples, size, size]``; example ``k`` of a character uses its covering fonts
    in a seeded rotation, so every font appears about equally often."""
    out = np.zeros((len(classes), examples, render.image_size, render.image_size), np.uint8)
    for i, (_, c, have) in enumerate(classes):
        start = int(np.random.default_rng([seed, c]).integers(len(have)))
        glyphs = {}
        for k in range(examples):
            font = have[(start + k) % len(have)]
            if font not in glyphs:
                glyphs[font] = render.glyph(fonts[font], chr(c))
            out[i, k] = render.draw(glyphs[font], np.random.default_rng([seed, c, k]))
    return out


def glyph_record(scripts: dict[str, list[str]], fonts: dict[str, Path], o: dict) -> dict:
    """Everything the rendered arrays depend on (their cache key)."""
    return {"format": FORMAT_VERSION, "scripts": scripts, "examples": o["examples"], "image_size": o["image_size"],
            "seed": o["seed"], "jitter": o["jitter"], "min_fonts": o["min_fonts"], "dedupe": o["dedupe"],
            "max_per_script": o["max_per_script"],
            "rendering": {"oversample": OVERSAMPLE, "font_size": FONT_SIZE, "fit": FIT, "scales": list(SCALES),
                          "rotation": ROTATION, "shift": SHIFT, "anchor": "mm", "affine": "bilinear",
                          "reduce": "box"},
            "pillow": PIL_VERSION, "freetype": ImageFont.core.freetype2_version,
            "fonts": {n: {"package": package_of(n), "sha256": font_digest(p)} for n, p in sorted(fonts.items())}}


def _check(o: dict) -> None:
    def whole(v, lo):
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo
    if not whole(o["examples"], 2):
        raise ConfigError(f"data.examples must be a whole number >= 2, not {o['examples']!r}")
    if not whole(o["image_size"], 8) or o["image_size"] > 256:
        raise ConfigError(f"data.image_size must be a whole number from 8 to 256, not {o['image_size']!r}")
    if not whole(o["min_fonts"], 1):
        raise ConfigError(f"data.min_fonts must be a whole number >= 1, not {o['min_fonts']!r}")
    for part in ("train", "val", "test"):
        names = o[f"{part}_scripts"]
        if not isinstance(names, list) or any(n not in SCRIPTS for n in names):
            raise ConfigError(f"data.{part}_scripts must be a list of script names from: {', '.join(SCRIPTS)}; "
                              f"got {names!r}")
    all_names = [n for p in ("train", "val", "test") for n in o[f"{p}_scripts"]]
    if len(set(all_names)) != len(all_names):
        raise ConfigError("a script may be in only one of data.train_scripts, val_scripts and test_scripts")


def load_glyphs(o: dict, cache: bool = True) -> tuple[dict[str, ClassDataset], dict]:
    """The three splits and the record of what made them (see the module docstring)."""
    _check(o)
    parts = {p: list(o[f"{p}_scripts"]) for p in ("train", "val", "test")}
    used = [n for p in parts.values() for n in p]
    script_fonts = {n: tuple(f for f in SCRIPTS[n].fonts) for n in used}
    fonts = find_fonts(sorted({f for fs in script_fonts.values() for f in fs}), tuple(o["font_dirs"]))
    scripts = {n: script_characters(SCRIPTS[n], o["max_per_script"], o["seed"]) for n in used}
    record = glyph_record({n: "".join(chr(c) for c in scripts[n]) for n in used}, fonts, o)
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:20]
    folder = user_cache_dir() / "glyphs" / digest

    def render_all():
        render = Render(o["image_size"], float(o["jitter"]))
        covered = {f: coverage(p) for f, p in fonts.items()}
        classes = choose_classes(scripts, fonts, covered, script_fonts, o["min_fonts"], o["dedupe"], render)
        images = render_classes(classes, fonts, o["examples"], o["seed"], render)
        return {"images": images, "script": np.array([s for s, _, _ in classes]),
                "code": np.array([c for _, c, _ in classes], dtype=np.int64),
                "fonts": np.array(["|".join(h) for _, _, h in classes])}, {}

    complete = lambda arrays, extra: set(arrays) == {"images", "script", "code", "fonts"}
    arrays = cached([folder], record, render_all, "glyph", complete)[0] if cache else render_all()[0]
    record = {**record, "classes": int(len(arrays["code"])),
              "images_sha256": hashlib.sha256(arrays["images"].tobytes()).hexdigest(), "cache": str(folder)}
    return make_splits(arrays, parts, o["image_size"]), record


def make_splits(arrays: dict, parts: dict[str, list[str]], image_size: int) -> dict[str, ClassDataset]:
    images, script, code = arrays["images"], arrays["script"], arrays["code"]
    n, k = images.shape[:2]
    train = np.isin(script, parts["train"])
    basis = images[train] if train.any() else images
    x = basis.astype(np.float64) / 255.0
    spec = ImageSpec(image_size, 1, False, "box", (float(x.mean()),), (max(float(x.std()), 1e-3),))
    out = {}
    for part, names in parts.items():
        rows = np.flatnonzero(np.isin(script, names))
        data = images[rows].reshape(-1, 1, image_size, image_size)
        labels = np.repeat(np.arange(len(rows)), k)
        class_names = [f"{script[r]}/U+{code[r]:04X} {chr(code[r])}" for r in rows]
        counts = {s: int((script[rows] == s).sum()) for s in names}
        what = ", ".join(f"{s} {c}" for s, c in counts.items())
        out[part] = ClassDataset(torch.from_numpy(np.ascontiguousarray(data)), torch.from_numpy(labels), class_names,
                                 spec, f"printed glyphs, {part}: {len(rows)} characters of {len(names)} scripts "
                                       f"({what}), {k} renderings each")
    return out


@dataclass(frozen=True, kw_only=True)
class GlyphOptions(Options):
    section = "data"
    train_scripts: list[str] = option(TRAIN_SCRIPTS, role=ARCHITECTURE)
    val_scripts: list[str] = option(VAL_SCRIPTS, role=ARCHITECTURE)
    test_scripts: list[str] = option(TEST_SCRIPTS, role=ARCHITECTURE)
    examples: int = option(40, low=2, high=100_000, role=ARCHITECTURE,
                           doc="renderings per character; 20-shot + 15 queries needs 35")
    image_size: int = option(28, low=8, high=256, role=ARCHITECTURE)
    seed: int = option(0, low=0, high=MAX_INT, role=ARCHITECTURE,
                       doc="fonts order, sizes, rotations, shifts; and the subset of large scripts")
    jitter: float = option(1.0, low=0, role=ARCHITECTURE, doc="scales rotation and shift; 0 = centred, upright")
    min_fonts: int = option(3, low=1, role=ARCHITECTURE, doc="fonts that must have a character for it to be a class")
    max_per_script: int = option(60, low=0, role=ARCHITECTURE, doc="characters per script at most; 0 = all")
    dedupe: float = option(0.9, low=0, high=1, role=ARCHITECTURE,
                           doc="leave out a character this correlated with an earlier one; 1 = keep all")
    font_dirs: list[str] = option([], role=DATA, doc="extra font folders, searched first")
    cache: bool = option(True, role=RUNTIME, doc="keep rendered arrays in the per-user cache")

    def check(self) -> None:
        _check(self.to_dict())


# The defaults as a plain dict, for load_glyphs.
GLYPH_OPTIONS = GlyphOptions().to_dict()


@lru_cache(maxsize=4)
def _cached(key: str):
    o = json.loads(key)
    return load_glyphs(o, cache=o.pop("cache"))


@register_data("glyphs", options=GlyphOptions)
class GlyphSource(ClassDataSource):
    def datasets(self, o: GlyphOptions) -> dict[str, ClassDataset]:
        return self.load(o)[0]

    def record(self, o: GlyphOptions) -> dict:
        """What the data set was made from (characters, fonts with SHA-256, rendering, versions)."""
        return self.load(o)[1]

    @staticmethod
    def load(o: GlyphOptions):
        return _cached(json.dumps(o.to_dict(), sort_keys=True))


__all__ = ["SCRIPTS", "load_glyphs", "GlyphSource", "find_fonts", "installed_fonts"]
