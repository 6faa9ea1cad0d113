"""What else the machine is doing while a benchmark times: CPU that other processes (and the hypervisor) took.

On a shared virtual machine the same epoch varies by 20 % or more from one minute to the next. Most of it comes with
CPU that is not ours: other processes' time and steal time (the hypervisor running someone else on our core), both
counted busy in /proc/stat. A benchmark subtracts its own CPU time (os.times) over a window and gets the cores others
used meanwhile; it waits for a quiet machine before a repeat and keeps the repeats that others disturbed least.
"""

import os
import time
from pathlib import Path


def busy_seconds(children: bool = False) -> tuple[float, float]:
    """(CPU-seconds all processes spent busy, per /proc/stat; CPU-seconds this process spent, with `children` also
    those of its children that have been waited for): their difference over a window is what others took meanwhile.

    Busy is user + nice + system + irq + softirq + steal (guest time is inside user); NaN where /proc/stat is not
    readable.
    """
    t = os.times()
    ours = t.user + t.system + ((t.children_user + t.children_system) if children else 0.0)
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return float("nan"), ours
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), ours


def others_between(before: tuple[float, float], after: tuple[float, float], seconds: float) -> float:
    """Cores others used between two `busy_seconds` readings `seconds` apart (never below 0)."""
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / seconds


def others_now(seconds: float = 0.5) -> float:
    """CPU cores other processes are using, sampled over `seconds` while this process sleeps."""
    before = busy_seconds()
    time.sleep(seconds)
    return others_between(before, busy_seconds(), seconds)


def wait_quiet(limit_s: float, cores: float) -> float:
    """Sleep until others use under `cores` cores (sampled over 0.5 s) or `limit_s` has passed; the last sample."""
    deadline = time.perf_counter() + limit_s
    while True:
        others = others_now()
        if others < cores or time.perf_counter() >= deadline:
            return others
