"""`divmerge demo`'s sweep over a built zoo: its five methods and its sweep file."""

from __future__ import annotations

from pathlib import Path

import yaml

from .demo_zoo import Zoo
from .sweep import SweepConfig, load_sweep

DEMO_METHODS = {
    "average": {"merge_method": "linear"},
    "task_arithmetic": {"merge_method": "task_arithmetic", "parameters": {"lambda": 1.0}},
    "ties": {"merge_method": "ties", "parameters": {"density": 0.2, "lambda": 1.0}},
    "adamerging_layer": {
        "merge_method": "adamerging",
        "parameters": {"granularity": "layer", "samples": 100},
    },
    "divmerge_js_layer": {
        "merge_method": "divmerge",
        "parameters": {"granularity": "layer", "samples": 100},
    },
}


def demo_sweep(zoo: Zoo, root: Path, size: str, k: str, seed: int) -> SweepConfig:
    """Write ROOT/demo_sweep.yaml, every k-subset of the zoo's tasks x DEMO_METHODS scored on
    the test rows (a sample: 100 per task, 20 for the small zoo), and load it."""
    spec = {
        "base_model": str(zoo.base),
        "experts": {t: str(p) for t, p in zoo.experts.items()},
        "tasks": str(zoo.tasks_yaml),
        "k": int(k) if k.isdigit() else k,
        "methods": DEMO_METHODS,
        "eval": {"split": "test", "limit": 100 if size == "default" else 20, "batch_size": 32},
        "results": "results.jsonl",
        "seed": seed,
    }
    sweep_file = root / "demo_sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    return load_sweep(sweep_file)
