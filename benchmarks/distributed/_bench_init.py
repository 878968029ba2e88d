"""Benchmarks 2 and 3: ``init_process_group`` with real spawned gloo ranks.

The rank functions here run in spawned children (``spawn_ranks`` of
``torch/testing/_internal/distributed/protocol_version_utils.py``), so they are module level. Each
child connects once to a TCPStore that rank 0 hosts, and runs several timed cycles
on fresh prefixes of it; a store barrier before every cycle keeps process start-up
and import skew out of the timed region.

Every cycle passes its own prefix of that store to ``init_process_group(store=...)``
rather than going through ``env://``: creating the TCPStore client is the same
work with the check on or off, and on this machine it can stall on a reverse DNS
lookup (see the docs), which would swamp the few milliseconds under study.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from collections.abc import Sequence
from unittest import mock

import torch.distributed as dist
from torch.distributed._protocol_version import CHECK_MODE_ENV
from torch.testing._internal.common_utils import find_free_port
from torch.testing._internal.distributed.protocol_version_utils import (
    MISMATCH,
    RankResult,
    spawn_ranks,
    versions_env,
)

from _bench_common import Target, format_table, median, store_barrier


# The check logs its outcome (with its own duration as the last argument) here.
CHECK_LOGGER = "torch.distributed._protocol_version"
CHECK_LOG_PREFIX = "Rank %s: protocol version check"


class _CheckDurations(logging.Handler):
    """Collects the durations the check reports in its log lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        # "passed in %.3fs" and "failed after %.3fs" both take (rank, seconds, ...).
        if isinstance(record.msg, str) and record.msg.startswith(CHECK_LOG_PREFIX):
            self.seconds.append(float(record.args[1]))  # type: ignore[index]

    def take(self) -> float | None:
        value = self.seconds[-1] if self.seconds else None
        self.seconds.clear()
        return value


def _capture_check_log() -> _CheckDurations:
    """Route the check's logger to a collector only: the check's INFO line carries its
    duration, and the children's output stays quiet."""
    handler = _CheckDurations()
    logger = logging.getLogger(CHECK_LOGGER)
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return handler


def _connect(rank: int, world_size: int, port: int) -> dist.TCPStore:
    return dist.TCPStore(
        "127.0.0.1",
        port,
        world_size,
        rank == 0,
        timedelta(seconds=120),
        wait_for_workers=True,
        use_libuv=True,
    )


def _leave(store: dist.TCPStore, rank: int, world_size: int) -> None:
    """Rank 0 hosts the store, so it leaves last: after every other rank is done with it."""
    if rank != 0:
        store.add("left", 1)
        return
    while store.add("left", 0) < world_size - 1:
        time.sleep(0.01)


def init_cycles(
    rank: int, world_size: int, port: int, modes: Sequence[str | None]
) -> list[tuple[float, float | None]]:
    """One ``init_process_group`` + ``destroy_process_group`` per mode, in order.

    ``TORCH_DISTRIBUTED_PROTOCOL_CHECK`` is read on every check, so the modes can
    alternate inside one process. Returns, per cycle, this rank's seconds around
    init + destroy and the check's own duration from its log line (``None`` when
    the check was off).
    """
    checks = _capture_check_log()
    base = _connect(rank, world_size, port)
    out = []
    for cycle, mode in enumerate(modes):
        # spawn_ranks starts the ranks with the variable unset: None keeps it so.
        with mock.patch.dict(os.environ, {} if mode is None else {CHECK_MODE_ENV: mode}):
            store_barrier(dist.PrefixStore(f"sync/{cycle}", base), world_size)
            started = time.perf_counter()
            dist.init_process_group(
                "gloo",
                store=dist.PrefixStore(f"cycle/{cycle}", base),
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=120),
            )
            dist.destroy_process_group()
            out.append((time.perf_counter() - started, checks.take()))
    _leave(base, rank, world_size)
    return out


def mismatch_trials(
    rank: int, world_size: int, port: int, late_rank: int, trials: int, delay: float
) -> list[dict[str, Any]]:
    """Time each rank's arrival in ``init_process_group`` and its RuntimeError.

    ``late_rank`` (the one on another version, through the parent's environment)
    sleeps ``delay`` seconds after the pre-barrier, so it is deliberately the last
    to arrive. The timeout is 300 s: a verdict that waited for it would show.
    """
    checks = _capture_check_log()
    base = _connect(rank, world_size, port)
    out = []
    for trial in range(trials):
        store_barrier(dist.PrefixStore(f"sync/{trial}", base), world_size)
        if rank == late_rank:
            time.sleep(delay)
        arrived = time.time()
        error = None
        try:
            dist.init_process_group(
                "gloo",
                store=dist.PrefixStore(f"trial/{trial}", base),
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=300),
            )
            dist.destroy_process_group()
        except RuntimeError as e:
            error = str(e).splitlines()[0]
        out.append(
            {"arrived": arrived, "failed": time.time(), "error": error, "check": checks.take()}
        )
    _leave(base, rank, world_size)
    return out


def _values(results: Sequence[RankResult]) -> list[Any]:
    failed = [r for r in results if not r.ok]
    if failed:
        first = failed[0]
        raise RuntimeError(
            f"{len(failed)} ranks failed; rank {first.rank}: {first.error_type}: {first.error}"
        )
    return [r.value for r in results]


# --------------------------------------------------------------------------- #
# Benchmark 2: init overhead
# --------------------------------------------------------------------------- #

ON, OFF = None, "off"  # unset = the default mode, error


def alternating_modes(pairs: int) -> list[str | None]:
    """A warm-up cycle, then ON OFF OFF ON ON OFF ...: each mode runs first half the time."""
    modes: list[str | None] = [ON]
    for i in range(pairs):
        modes += [ON, OFF] if i % 2 == 0 else [OFF, ON]
    return modes


@dataclass
class InitResult:
    world_size: int
    on: list[float]  # per cycle: max over ranks of init + destroy, check on
    off: list[float]
    pair_ratios: list[float]  # on / off of the two cycles of each pair
    check: list[float]  # per cycle with the check on: max over ranks of the check's duration


def measure_init(world_size: int, spawns: int, pairs: int) -> InitResult:
    result = InitResult(world_size, [], [], [], [])
    modes = alternating_modes(pairs)
    for _ in range(spawns):
        values = _values(
            spawn_ranks(init_cycles, world_size, args=(find_free_port(), modes), timeout=300.0)
        )
        cycles = []
        for cycle in range(1, len(modes)):  # cycle 0 warms up
            walls = [rank_cycles[cycle][0] for rank_cycles in values]
            checks = [rank_cycles[cycle][1] for rank_cycles in values]
            cycles.append((modes[cycle], max(walls), checks))
        for first, second in zip(cycles[::2], cycles[1::2]):
            on, off = (first, second) if first[0] is ON else (second, first)
            result.on.append(on[1])
            result.off.append(off[1])
            result.pair_ratios.append(on[1] / off[1])
            result.check.append(max(c for c in on[2] if c is not None))
    return result


def init_table(results: Sequence[InitResult]) -> str:
    rows = []
    for res in results:
        on, off = median(res.on), median(res.off)
        rows.append(
            [
                res.world_size,
                len(res.on),
                f"{off * 1e3:.1f}",
                f"{on * 1e3:.1f}",
                f"{(median(res.pair_ratios) - 1) * 100:+.1f}",
                f"{(on / off - 1) * 100:+.1f}",
                f"{median(res.check) * 1e3:.1f}",
            ]
        )
    headers = [
        "ranks",
        "pairs",
        "off ms",
        "on ms",
        "overhead % (paired)",
        "overhead % (medians)",
        "check ms",
    ]
    return format_table(headers, rows)


def init_targets(results: Sequence[InitResult], target_ranks: int = 8) -> list[Target]:
    out = []
    for res in results:
        if res.world_size == target_ranks:
            overhead = (median(res.pair_ratios) - 1) * 100
            out.append(
                Target(
                    f"init+destroy overhead at {target_ranks} ranks (median of paired ratios)",
                    f"{overhead:+.1f} %",
                    "within 5 %",
                    overhead <= 5.0,
                )
            )
    return out


# --------------------------------------------------------------------------- #
# Benchmark 3: time to verdict on a mismatch
# --------------------------------------------------------------------------- #


@dataclass
class VerdictTrial:
    late_rank: int
    last_arrival_rank: int
    verdict: float  # last RuntimeError minus last arrival, seconds
    late_check: float | None  # the check's own duration on the late rank
    errors: int  # ranks that raised the mismatch error


@dataclass
class VerdictResult:
    world_size: int
    late_rank: int
    delay: float  # how late the odd rank arrives, seconds
    trials: list[VerdictTrial]


def measure_verdict(
    world_size: int, late_rank: int, trials: int, delay: float, other_version: int = 2
) -> VerdictResult:
    values = _values(
        spawn_ranks(
            mismatch_trials,
            world_size,
            args=(find_free_port(), late_rank, trials, delay),
            rank_env=versions_env({late_rank: other_version}),
            timeout=120.0 + trials * (delay + 5.0),
        )
    )
    out = VerdictResult(world_size, late_rank, delay, [])
    for trial in range(trials):
        rows = [rank_trials[trial] for rank_trials in values]
        arrivals = [row["arrived"] for row in rows]
        last = max(range(world_size), key=arrivals.__getitem__)
        # Only the mismatch verdict counts: a timeout or a store error is a failure here.
        failed = [row["failed"] for row in rows if MISMATCH in (row["error"] or "")]
        out.trials.append(
            VerdictTrial(
                late_rank,
                last,
                max(failed) - arrivals[last] if failed else float("nan"),
                rows[late_rank]["check"],
                len(failed),
            )
        )
    return out


def verdict_table(results: Sequence[VerdictResult]) -> str:
    rows = []
    for res in results:
        verdicts = [t.verdict for t in res.trials]
        rows.append(
            [
                res.world_size,
                f"{res.late_rank}{' (coordinator)' if res.late_rank == 0 else ''}",
                f"{res.delay:g}",
                len(res.trials),
                f"{sum(t.last_arrival_rank == res.late_rank for t in res.trials)}/{len(res.trials)}",
                f"{min(t.errors for t in res.trials)}/{res.world_size}",
                f"{median(verdicts) * 1e3:.1f}",
                f"{max(verdicts) * 1e3:.1f}",
            ]
        )
    headers = ["ranks", "odd rank", "late by s", "trials", "odd rank last", "ranks raising", "median ms", "max ms"]
    return format_table(headers, rows)


# The brief's bounds on the time from the last arrival to the last rank's verdict.
VERDICT_MEDIAN_S, VERDICT_MAX_S = 0.020, 0.050


def verdict_targets(results: Sequence[VerdictResult]) -> list[Target]:
    """Over every spread: the median and the worst time from the last arrival to the last
    rank's mismatch error, every rank raising it in every trial."""
    verdicts = [t.verdict for res in results for t in res.trials]
    all_raised = all(t.errors == res.world_size for res in results for t in res.trials)
    return [
        Target(
            "time to verdict after the last arrival, every spread and odd rank (median, max; every rank raised)",
            f"{median(verdicts) * 1e3:.1f} ms, {max(verdicts) * 1e3:.1f} ms, all raised: {all_raised}",
            f"<= {VERDICT_MEDIAN_S * 1e3:.0f} ms, <= {VERDICT_MAX_S * 1e3:.0f} ms",
            median(verdicts) <= VERDICT_MEDIAN_S and max(verdicts) <= VERDICT_MAX_S and all_raised,
        )
    ]
