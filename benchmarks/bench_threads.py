"""A shortened `cones find` on the embedded model, idle and beside one busy process, per thread setting.

    python benchmarks/bench_threads.py                       # 30-step search, threads 2 (torch's default
                                                             # on 2 cores) and 0 (cones' choice), 2 repeats
    python benchmarks/bench_threads.py --steps 20 --repeats 1 --threads 0 1 2

Each run is a fresh `python -m cones find --format json --threads N` process on one of the world's subjects
(5 reference renders, cached class images), timed by the search's own clock (`seconds` in its summary:
class images from the cache, then the search). "Busy" runs start `python -c "while True: pass"` beside
it first, the load the issue measured (`cones demo`'s search went from 51 s to 918 s beside one). The
slowdown is busy / idle for the same setting; the machine should be otherwise quiet. Results:
`benchmarks/results/threads.json` and `threads.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results_io import save_results  # noqa: E402


def find_once(folder: str, out: str, cache: str, steps: int, threads: int) -> dict:
    command = [
        sys.executable,
        "-m",
        "cones",
        "find",
        "--images",
        folder,
        "--token",
        "sks",
        "--class-word",
        "star",
        "--out",
        out,
        "--overwrite",
        "--steps",
        str(steps),
        "--sparsity",
        "0.05",
        "--num-class-images",
        "8",
        "--cache-dir",
        cache,
        "--format",
        "json",
        "--threads",
        str(threads),
    ]
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench_threads: cones find failed:\n{done.stderr[-2000:]}")
    summary = json.loads(done.stdout)
    return {"search_seconds": summary["seconds"], "process_seconds": round(time.time() - started, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30, help="search steps per run")
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 0], help="settings (0: cones' choice)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per cell (the median is reported)")
    parser.add_argument("--subject", default="smiling-star")
    parser.add_argument("--name", default="threads")
    args = parser.parse_args()

    from cones.threads import busy_cores
    from cones_world.concepts import references
    from cones_world.subjects import SUBJECTS

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "photos")
        os.makedirs(folder)
        for i, picture in enumerate(references(SUBJECTS[args.subject])[1]):
            picture.save(os.path.join(folder, f"{i}.png"))
        out, cache = os.path.join(tmp, "c.cones"), os.path.join(tmp, "class-cache")
        find_once(folder, out, cache, 2, 1)  # class images into the cache; every timed run reads them
        cells: dict[str, dict] = {}
        for load in ("idle", "busy"):
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
            try:
                # how busy the machine is besides cones (the hog included): an "idle" that is not shows here
                cells[f"{load}/machine_busy_cores"] = round(busy_cores(1.0) or 0.0, 2)
                print(load, "busy cores", cells[f"{load}/machine_busy_cores"], flush=True)
                for threads in args.threads:
                    runs = [find_once(folder, out, cache, args.steps, threads) for _ in range(args.repeats)]
                    seconds = statistics.median(r["search_seconds"] for r in runs)
                    cells[f"{load}/{threads}"] = {"runs": runs, "search_seconds": seconds}
                    print(load, threads, json.dumps(cells[f"{load}/{threads}"]), flush=True)
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()

    rows = []
    for threads in args.threads:
        idle, busy = cells[f"idle/{threads}"]["search_seconds"], cells[f"busy/{threads}"]["search_seconds"]
        name = "0 (cones' choice)" if threads == 0 else str(threads)
        rows.append({"threads": threads, "idle": idle, "busy": busy, "slowdown": round(busy / idle, 2)})
        cells[f"slowdown/{threads}"] = round(busy / idle, 2)
        rows[-1]["label"] = name
    report = {
        "settings": {
            "steps": args.steps,
            "repeats": args.repeats,
            "subject": args.subject,
            "cores": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
        },
        "cells": cells,
        "rows": rows,
    }
    lines = [
        f"`cones find` on the embedded model, {args.steps}-step search, median of {args.repeats}, "
        f'{os.cpu_count()} cores; busy = beside one `python -c "while True: pass"`. Cores busy besides cones, '
        f"measured before each column: idle {cells['idle/machine_busy_cores']}, "
        f"busy {cells['busy/machine_busy_cores']}.",
        "",
        "| --threads | idle (s) | beside a busy process (s) | slowdown |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['label']} | {r['idle']:.1f} | {r['busy']:.1f} | {r['slowdown']:.2f}× |" for r in rows]
    save_results(args.name, report, "\n".join(lines))


if __name__ == "__main__":
    main()
