"""How long `cones --help` and `cones find --help` take, beside `python -c "import torch"` in the same run.

A command's help must answer at once: the subcommands import torch and diffusers only when work starts.
The three commands run in turn (A, B, C, A, B, C, ...), so that a drift in the machine's speed reaches each
alike; the table gives medians and each command's ratio to importing torch.

    python benchmarks/bench_cli_start.py            # writes benchmarks/results/cli-start.{json,md}
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from results_io import save_results

COMMANDS = {
    "cones --help": [sys.executable, "-m", "cones", "--help"],
    "cones find --help": [sys.executable, "-m", "cones", "find", "--help"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.runs + 1):  # the first round warms the file cache and is not counted
        for name, command in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            seconds[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values[1:]) for name, values in seconds.items()}
    torch_s = medians["python -c 'import torch'"]
    report = {
        "runs": args.runs,
        "median_seconds": medians,
        "ratio_to_import_torch": {name: m / torch_s for name, m in medians.items()},
    }
    lines = ["| command | median wall seconds | / import torch |", "|---|---|---|"]
    lines += [f"| `{name}` | {m:.3f} | {m / torch_s:.2f} |" for name, m in medians.items()]
    lines += ["", f"{args.runs} runs each, interleaved, after one warm-up round."]
    save_results("cli-start", report, "\n".join(lines))


if __name__ == "__main__":
    main()
