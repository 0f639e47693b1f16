"""What the benchmarks record about the machine they ran on (these machines are shared and noisy,
so every result carries its CPU and the load around it)."""

from __future__ import annotations

import os
import platform


def load() -> str:
    """The 1, 5 and 15 minute load averages, e.g. ``"1.64 4.15 6.66"``."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
