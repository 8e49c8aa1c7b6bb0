"""How many CPU threads torch may use, so that a busy machine slows cones in proportion.

torch starts one intra-op thread per core. Each parallel region waits for all of them, so when another
CPU-bound program holds a core, every matrix product waits for the thread the scheduler parked: on 2 cores
beside one busy process, `cones demo`'s search went from 51 s to 918 s (0.12-5.4 s a step). With no more
threads than there are free cores the work only shares the machine
(`benchmarks/bench_threads.py` measures both; results in `benchmarks/results/threads.md`).

`choose_threads()` gives 1 thread on a machine of 1 or 2 usable cores. There a second thread made an idle
search 1.6x faster (4.2 s against 6.7 s for 30 steps of `cones find` on the embedded model), but any
other program that ran meanwhile stalled it: 10-100 s for the same search beside a test run, 129 s beside
one busy process, where one thread took 6-14 s (`benchmarks/results/threads.md`). On larger machines it
measures for a moment how many cores other programs keep busy (from /proc/stat, where it exists) and
leaves those out: at least 1 thread, at most the free cores. `configure(n)` applies an explicit number or
that choice; the heavy commands take it as `--threads` (`0`: choose).
"""

from __future__ import annotations

import os
import time

__all__ = ["busy_cores", "choose_threads", "configure", "usable_cores"]

SAMPLE_SECONDS = 0.25  # how long the machine's load is watched before choosing
SMALL_MACHINE = 2  # up to this many usable cores, one thread (see above)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, or None where /proc/stat is not readable."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values[:8]) - idle, sum(values[:8])


def busy_cores(seconds: float = SAMPLE_SECONDS) -> float | None:
    """How many of the machine's cores were busy over the next `seconds` (None: cannot tell here).

    The calling process sleeps meanwhile, so what is counted is other programs' load.
    """
    first = _cpu_times()
    if first is None:
        return None
    time.sleep(seconds)
    second = _cpu_times()
    if second is None or second[1] <= first[1]:
        return None
    share = (second[0] - first[0]) / (second[1] - first[1])
    return share * (os.cpu_count() or 1)


def choose_threads(busy: float | None = None) -> int:
    """Threads for torch: 1 on a small machine, else the usable cores less those other programs keep busy.

    `busy` is the number of busy cores (measured with `busy_cores()` when None). A core counts as taken
    when it is more than a quarter busy, so a short spike of a shell does not halve cones' speed.
    """
    cores = usable_cores()
    if cores <= SMALL_MACHINE:
        return 1
    if busy is None:
        busy = busy_cores()
    if busy is None:
        return cores
    taken = int(busy + 0.75)  # round up past a quarter
    return max(1, min(cores, cores - taken))


def configure(threads: int | None = 0) -> int:
    """Set torch's intra-op threads to `threads` (None or 0: `choose_threads()`); return the number set."""
    import torch

    if threads is None or threads == 0:
        threads = choose_threads()
    if threads < 0:
        raise ValueError(f"`threads` {threads} is negative; pass a count of threads, or 0 to choose by load")
    torch.set_num_threads(threads)
    return threads
