"""Benchmark 4: the cluster preflight's wall time at scale, against a store barrier.

The same set-up as benchmark 1 (:mod:`_bench_store_scale`): N simulated ranks are
threads, each with its own TCPStore client of one libuv server, released together;
the time runs to the last thread's return. The preflight is the real
:func:`torch.distributed._protocol_version._preflight.preflight` as it runs when
rank 0 hosts the store: the exchange of ``init_process_group``, then rank 0
reading every payload back and rendering the table, and staying until every
other rank has read the verdict (printing is left out: ``emit`` drops the
report). Variants are interleaved per repetition on fresh key prefixes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.distributed as dist
from torch.distributed._protocol_version._preflight import EXIT_START, preflight

from _bench_common import format_table, median
from _bench_store_scale import Cluster, FLOOR, floor_barrier, run_ranks, TIMEOUT


PREFLIGHT = "preflight"


def run_preflight(store: dist.Store, rank: int, world_size: int) -> None:
    code = preflight(store, rank, world_size, TIMEOUT, "gloo", emit=lambda report: None)
    if code != EXIT_START:
        raise RuntimeError(f"rank {rank}: the preflight would not start the job (exit {code})")


VARIANTS = {FLOOR: floor_barrier, PREFLIGHT: run_preflight}


def measure(world_size: int, reps: int) -> dict[str, list[float]]:
    """Wall seconds per variant, one value per repetition, after a warm-up of each."""
    cluster = Cluster.build(world_size)

    def stores(prefix: str) -> list[dist.Store]:
        return [dist.PrefixStore(prefix, client) for client in cluster.clients]

    for name, body in VARIANTS.items():
        run_ranks(stores(f"warmup/{name}"), body)
    walls: dict[str, list[float]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for rep in range(reps):
        for name in names[rep % 2 :] + names[: rep % 2]:
            walls[name].append(run_ranks(stores(f"bench/{rep}/{name}"), VARIANTS[name]).wall)
    return walls


def table(results: dict[int, dict[str, list[float]]]) -> str:
    rows = []
    for world_size, walls in results.items():
        ratios = [p / b for p, b in zip(walls[PREFLIGHT], walls[FLOOR])]
        rows.append(
            [
                world_size,
                len(ratios),
                f"{median(walls[FLOOR]) * 1e3:.1f}",
                f"{median(walls[PREFLIGHT]) * 1e3:.1f}",
                f"{median(ratios):.2f}",
                f"{min(ratios):.2f}-{max(ratios):.2f}",
            ]
        )
    headers = ["N", "reps", "barrier ms", "preflight ms", "x barrier", "x range"]
    return format_table(headers, rows)


def bench(sizes: Sequence[int], reps: int) -> str:
    return table({world_size: measure(world_size, reps) for world_size in sizes})

