"""What the benchmarks share (they run as scripts: `python bench/NAME.py`, this folder on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, missing: float = float("nan")) -> float:
    """User + system CPU time of a process (Linux /proc); `missing` when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return missing
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory (`VmRSS`) or its peak (`VmHWM`) in MB (Linux /proc); nan when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
