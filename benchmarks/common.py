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
