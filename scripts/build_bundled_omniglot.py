"""Build metamap/data/bundled/omniglot28.npz from the two official Omniglot archives.

    python scripts/build_bundled_omniglot.py --archives DIR --out metamap/data/bundled/omniglot28.npz

DIR holds images_background.zip and images_evaluation.zip (from
https://github.com/brendenlake/omniglot, folder ``python``; MIT licence, see
metamap/data/bundled/LICENSE-omniglot). The output depends only on the images inside the
archives, not on their zip bytes or file times, so rebuilding gives a byte-identical file;
its SHA-256 is printed so two builds can be compared. ``--stats`` also prints the pixel
mean/std of the background set, the source of ``metamap.data.omniglot.MEAN``/``STD``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from metamap.data import omniglot, omniglot_archives
from metamap.data.download import file_digest
from metamap.data.omniglot_archives import ARCHIVES, SETS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archives", type=Path, required=True, help="folder with the two official archives")
    p.add_argument("--out", type=Path, default=omniglot.BUNDLED_PATH,
                   help="output .npz (default: %(default)s)")
    p.add_argument("--size", type=int, default=omniglot.BUNDLED_SIZE,
                   help="image side in pixels (default: %(default)s)")
    p.add_argument("--stats", action="store_true", help="print the background set's pixel mean and std")
    p.add_argument("--skip-count-check", action="store_true",
                   help="accept archives with other numbers of characters (tests, subsets)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def background_stats(images: np.ndarray) -> tuple[float, float]:
    """Pixel mean and population std of ``uint8`` images, in [0, 1] units, computed in float64."""
    x = images.astype(np.float64) / 255.0
    return float(x.mean()), float(x.std())


def build(archives: Path, out: Path, size: int, check_counts: bool = True, progress: bool = True):
    """Decode both archives at ``size`` and write them to ``out``; returns the decoded sets."""
    spec = omniglot.omniglot_spec(size)
    sets = {}
    for s in SETS:
        path = archives / ARCHIVES[s]
        sets[s] = omniglot_archives.read_archive(path, spec, top=Path(ARCHIVES[s]).stem, progress=progress)
        if check_counts:
            omniglot_archives.check_counts(s, sets[s], str(path))
    omniglot.write_sets(out, sets, omniglot.set_meta(spec))
    return sets


def main(argv=None) -> int:
    args = parse_args(argv)
    sets = build(args.archives, args.out, args.size, not args.skip_count_check, not args.quiet)
    for s in SETS:
        chars = sets[s]
        print(f"{s}: {len(chars.names)} characters, {len(chars.alphabets())} alphabets, "
              f"{len(chars.labels)} drawings, images {tuple(chars.images.shape)}")
    if args.stats:
        mean, std = background_stats(sets["background"].images)
        print(f"background pixel mean {mean:.6f} std {std:.6f}")
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")
    print(f"sha256 {file_digest(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
