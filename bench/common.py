"""Paths and small helpers shared by the bench scripts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "runs" / "bench"


def demo_overrides(config: str) -> list[str]:
    """configs/demo.yaml reads its inputs from the demo cache; point it there explicitly."""
    if Path(config).stem != "demo":
        return []
    from lorif_dist.demo import cache_dir

    root = cache_dir()
    files = [root / "alpaca_en_demo.json", root / "identity.json"]
    return [
        "--model.name_or_path",
        str(root / "smollm2-135m-instruct"),
        "--data.train_files",
        ",".join(str(p) for p in files),
    ]


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    return path
