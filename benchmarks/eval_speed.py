"""Evaluation speed, side by side in one run: every episode's examples encoded per episode (the
path before issue 15) against each distinct example encoded once (``eval.cache_mb``).

    python benchmarks/eval_speed.py                              # ProtoNet, 1000 20-way 1-shot episodes
    python benchmarks/eval_speed.py --learners protonet,matching,siamese,relation,finetune --episodes 300

Each learner is built from its benchmark config (random weights: the speed does not depend on
them) and scored on the fixed test episodes of the Omniglot lake split (evaluation alphabets,
15 queries per class; Relation Networks: 5, as in its config). Variants run round-robin,
``--rounds`` times; the table gives median episodes/s and checks that every variant's per-episode
scores equal the per-episode fp32 path's (the largest difference is printed). Results:
benchmarks/results/eval_speed.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import facts_line, median, save

from metamap import config as configlib
from metamap.train.evaluate import evaluate
from metamap.train.precision import native_bf16
from metamap.train.run import build, memory_format_for, setup_runtime

CONFIGS = {
    "protonet": "configs/protonet-omniglot.toml",
    "matching": "configs/matching-omniglot-20way.toml",
    "siamese": "configs/siamese-omniglot-20way.toml",
    "relation": "configs/relation-omniglot-5way.toml",
    "finetune": "configs/finetune-omniglot-linear.toml",
}
VARIANTS = {                                 # name -> (cache_mb, precision)
    "per episode, fp32": (0, "fp32"),         # the path before issue 15

    "per episode, bf16": (0, "bf16"),
    "cached, fp32": (1024, "fp32"),
    "cached, bf16": (1024, "bf16"),
}
BASE = "per episode, fp32"
ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--learners", default="protonet")
    p.add_argument("--episodes", type=int, default=1000)
    p.add_argument("--ways", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--only", default="", help="comma separated substrings of variant names to run")
    args = p.parse_args()
    variants = {n: v for n, v in VARIANTS.items()
                if not args.only or any(k in n for k in args.only.split(",")) or n == BASE}
    load = os.getloadavg()
    print(facts_line())
    print(f"native bf16: {native_bf16(torch.device('cpu')) or 'none'}; load average {load[0]:.1f} {load[1]:.1f} "
          f"{load[2]:.1f} at the start", flush=True)
    rows = []
    for name in args.learners.split(","):
        cfg = configlib.resolve(ROOT / CONFIGS[name], [f"eval.ways=[{args.ways}]", "eval.shots=[1]",
                                                      f"train.threads={args.threads}"])
        device = setup_runtime(cfg)
        source, info, learner = build(cfg)
        fmt = memory_format_for(cfg, info)
        if fmt is not None:
            learner.to(memory_format=fmt)
        sampler = source.sampler(cfg, "test", args.ways, 1, cfg["eval"]["queries"], 1, cfg["eval"]["seed"])
        times, scores = {v: [] for v in variants}, {}
        for _ in range(args.rounds):
            for v, (cache_mb, precision) in variants.items():
                t0 = time.perf_counter()
                r = evaluate(learner, sampler, args.episodes, device=device, memory_format=fmt, progress=False,
                             precision=precision, cache_mb=cache_mb)
                times[v].append(time.perf_counter() - t0)
                scores[v] = torch.tensor(r.scores)
        base = args.episodes / median(times[BASE])
        for v, (_, precision) in variants.items():
            rate = args.episodes / median(times[v])
            same = scores.get(f"per episode, {precision}")
            rows.append({"learner": name, "variant": v, "episodes_per_s": rate, "speedup": rate / base,
                         "seconds": median(times[v]), "times": times[v],
                         "max_score_difference": None if same is None else float((scores[v] - same).abs().max()),
                         "setting": f"{sampler.describe()}, {args.episodes} episodes"})
    end = os.getloadavg()
    print(f"\n| learner | variant | seconds (median) | episodes/s | vs per episode fp32 | "
          f"max score difference vs per-episode path of the same precision |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        diff = "-" if r["max_score_difference"] is None else f"{r['max_score_difference']:.1e}"
        print(f"| {r['learner']} | {r['variant']} | {r['seconds']:.1f} | {r['episodes_per_s']:.1f} | "
              f"{r['speedup']:.1f}x | {diff} |")
    print(f"\nload average at the end: {end[0]:.1f} {end[1]:.1f} {end[2]:.1f}")
    save("eval_speed", {"command": "python benchmarks/eval_speed.py " + " ".join(sys.argv[1:]),
                        "load_start": load, "load_end": end, "rows": rows})


if __name__ == "__main__":
    main()
