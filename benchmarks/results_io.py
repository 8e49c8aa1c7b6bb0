"""Where every benchmark's numbers go: `benchmarks/results/NAME.json` and `NAME.md`, each written whole.

A benchmark killed while it writes leaves the previous results in place, never half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# Subject detectors fitted through the model's VAE, kept between runs (keyed by CLIP, VAE and renders).
DETECTOR_CACHE = str(Path(__file__).parent.parent / "runs" / "detector-cache")


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_results(name: str, report: dict, table: str, folder: str | os.PathLike = RESULTS) -> None:
    """`report` as NAME.json and `table` (markdown) as NAME.md in `folder`, then the table on stdout."""
    write_atomic(Path(folder) / f"{name}.json", json.dumps(report, indent=2) + "\n")
    write_atomic(Path(folder) / f"{name}.md", table if table.endswith("\n") else table + "\n")
    print(table)


def resumed(name: str, settings: dict, folder: str | os.PathLike = RESULTS) -> dict:
    """`{"settings": settings, "subjects": {...}}`: the subjects of an earlier NAME.json measured with equal
    settings, so that an interrupted per-subject benchmark goes on where it stopped; else none."""
    path = Path(folder) / f"{name}.json"
    if path.exists():
        earlier = json.loads(path.read_text())
        if earlier.get("settings") == settings:
            return earlier
    return {"settings": settings, "subjects": {}}
