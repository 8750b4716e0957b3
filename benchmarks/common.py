"""Shared by the benchmark scripts: machine facts and result files."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from metamap.train.runtime import machine_facts

RESULTS = Path(__file__).parent / "results"


def facts_line() -> str:
    f = machine_facts()
    return (f"machine: {f['cores']} cores ({f['cpu']}), torch {f['torch']} with {f['torch_threads']} threads, "
            f"Python {f['python']}")


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"machine": machine_facts(), "date": time.strftime("%Y-%m-%d %H:%M"), **payload}
    path.write_text(json.dumps(payload, indent=2))
    return path


def median(xs) -> float:
    return statistics.median(xs)


def train_and_record(config: dict, run_dir: Path, name: str, command: str, progress: bool = False,
                     resume: bool = False, **extra) -> dict:
    """Train ``config`` into ``run_dir`` with the shared trainer (which also tests it), and save
    the result as benchmarks/results/<name>.json: command, config, summary, wall times, tasks/s."""
    from metamap.train.run import train
    t0 = time.perf_counter()
    summary = train(config, run_dir, resume=run_dir if resume else None, progress=progress)
    total = time.perf_counter() - t0
    log = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    speeds = [r["tasks_per_s"] for r in records if "tasks_per_s" in r]
    result = {"command": command, "config": config, "summary": summary, "total_seconds": round(total, 1),
              "test_seconds": round(total - summary["train_seconds"], 1),
              "train_tasks_per_s": speeds[-1] if speeds else None, **extra}
    save(name, result)
    return result


def mann_presentations(learner, config: dict, episodes: int = 1000, seed: int = 2024) -> dict[int, tuple[float, float]]:
    """MANN's figures as Santoro et al. report them: accuracy at the k-th presentation of a class
    (k = 1..10) over fixed 5-class x 10-instance test sequences, ``{k: (mean, ci95)}`` over episodes."""
    import torch

    from metamap.registry import data_source
    from metamap.train.evaluate import confidence_interval
    sampler = data_source(config).sampler(config, "test", 5, 1, 9, 50, seed)     # 5 classes x 10 instances
    per_episode = []
    learner.eval()
    with torch.no_grad():
        for i in range(max(1, episodes // 50)):
            logits, labels, shown = learner.sequence_outputs(sampler.batch(i))    # [T, L, ways], [T, L], [T, L]
            correct = (logits.argmax(-1) == labels).double()
            per_episode.append(torch.stack([(correct * (shown == k)).sum(1) / (shown == k).sum(1)
                                            for k in range(1, 11)], 1))          # [T, 10]
    acc = torch.cat(per_episode)
    return {k: confidence_interval(acc[:, k - 1])[:2] for k in range(1, 11)}
