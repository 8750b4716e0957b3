"""ProtoNet training speed on Omniglot shapes, side by side in one run.

    python benchmarks/protonet_speed.py [--steps 30] [--repeats 3]

Episodes/s of metamap's training step (20-way 1-shot, 15 queries/class, Conv-4, 28x28) with
its CPU levers on and off, against a plain-PyTorch reference step (nn.Module Conv-4,
torch.cdist, default memory format and allocator). Each variant runs in its own process
(the allocator setting is process-wide), repeated round-robin; medians are reported.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import facts_line, median, save

VARIANTS = {
    "plain PyTorch reference": dict(kind="reference", channels_last=False, allocator=False),
    "metamap, levers off": dict(kind="metamap", channels_last=False, allocator=False),
    "metamap + channels-last": dict(kind="metamap", channels_last=True, allocator=False),
    "metamap + allocator": dict(kind="metamap", channels_last=False, allocator=True),
    "metamap default (both)": dict(kind="metamap", channels_last=True, allocator=True),
    "metamap default + bf16 autocast (train.precision=bf16)": dict(kind="metamap", channels_last=True,
                                                                    allocator=True, bf16=True),
}


def worker(kind: str, channels_last: bool, allocator: bool, steps: int, bf16: bool = False) -> float:
    import time

    import torch
    import torch.nn.functional as F

    from metamap import config as configlib
    from metamap.train.run import build
    from metamap.train.runtime import tune_allocator
    if allocator:
        tune_allocator()
    cfg = configlib.resolve()
    source, info, learner = build(cfg)
    sampler = source.sampler(cfg, "train", 20, 1, 15, 1, 0)
    fmt = torch.channels_last if channels_last else None
    if fmt is not None:
        learner.to(memory_format=fmt)
    opt = torch.optim.Adam(learner.parameters(), 1e-3)

    def reference_loss(b):
        enc = learner.encoder
        s = enc(b.support_x[0]).flatten(1)
        q = enc(b.query_x[0]).flatten(1)
        protos = torch.stack([s[b.support_y[0] == c].mean(0) for c in range(b.ways)])
        return F.cross_entropy(-torch.cdist(q, protos) ** 2, b.query_y[0])

    times = []
    for i in range(steps + 5):
        b = sampler.batch(i).to(memory_format=fmt)
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = reference_loss(b) if kind == "reference" else learner.meta_loss(b)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 5:                        # warm-up steps are not timed
            times.append(time.perf_counter() - t)
    return 1.0 / median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", default="", help="comma separated substrings of variant names to run")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(**json.loads(args.worker), steps=args.steps)))
        return
    print(facts_line(), flush=True)
    names = [n for n in VARIANTS if not args.only or any(k in n for k in args.only.split(","))]
    rates = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            v = VARIANTS[name]
            out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--worker", json.dumps(v)],
                                 capture_output=True, text=True, check=True, env=os.environ.copy())
            rates[name].append(float(out.stdout.strip().splitlines()[-1]))
    ref = median(rates[names[0]])
    print(f"\n| variant | episodes/s (median) | vs {names[0]} |")
    print("|---|---|---|")
    for name, rs in rates.items():
        print(f"| {name} | {median(rs):.2f} | {median(rs) / ref:.2f}x |")
    # A run of some variants only gets its own file, so it does not replace the full comparison.
    suffix = "-".join(k.strip().replace(" ", "_") for k in args.only.split(",")) if args.only else ""
    name = "protonet_speed" + ("-" + suffix if suffix else "")
    save(name, {"command": "python benchmarks/protonet_speed.py " + " ".join(sys.argv[1:]),
                            "episodes_per_s": rates})


if __name__ == "__main__":
    main()
