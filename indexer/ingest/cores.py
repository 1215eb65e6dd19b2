"""How many CPU cores this process may use: one answer for decode workers, tagging threads and benchmarks."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores in this process's affinity mask (a container's or `taskset`'s CPU set), not the host's count.

    `os.cpu_count()` reports every core of the host, so inside a container limited to 2 CPUs it would start as
    many decode processes as the host has cores, and they would pre-empt the embedding.
    """
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
