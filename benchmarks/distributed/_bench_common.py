"""Small pieces shared by the protocol version benchmarks: statistics, tables,
the store barrier and the target verdicts."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from collections.abc import Sequence

import torch.distributed as dist


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Right-aligned plain-text table, readable in a terminal and in markdown code blocks."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def store_barrier(store: dist.Store, world_size: int) -> None:
    """The cheapest store barrier: one ``add`` and one ``wait`` per rank.

    The rank that completes the count also sets the release key. It is the floor
    the check is compared with, and the pre-synchronisation of the spawned
    benchmarks (so that start-up skew is not timed). Use a fresh prefix each time.
    """
    if store.add("arrived", 1) == world_size:
        store.set("released", "1")
    store.wait(["released"])


@dataclass(frozen=True)
class Target:
    """One target of the brief and whether this run met it."""

    name: str
    measured: str
    limit: str
    met: bool

    def line(self) -> str:
        status = "MET   " if self.met else "MISSED"
        return f"[{status}] {self.name}: {self.measured} (target {self.limit})"
