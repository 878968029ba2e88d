"""Benchmark 1: the cost of the check at scale, against a store barrier and a naive design.

N simulated ranks are threads of this process, each with its own TCPStore client
of one libuv TCPStore server (also in this process). Every repetition runs the
variants back to back on fresh key prefixes, and every variant releases its
N threads through one ``threading.Barrier``: the time runs from that release to
the last thread's return. Client construction and connection are not timed.

Threads share one GIL, so the Python work of all N ranks is serialised here
while real ranks run it in parallel on their own hosts; the process CPU per rank
(client, server and Python work together) is reported beside the wall time.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from collections.abc import Callable, Sequence

import torch.distributed as dist
from torch.distributed._protocol_version import check_protocol_version
from torch.distributed._protocol_version._exchange import JUDGED
from torch.testing._internal.distributed.protocol_version_utils import RankThreads

from _bench_common import Target, format_table, median, store_barrier


TIMEOUT = timedelta(seconds=120)
# The naive design publishes a payload as large as the check's (~150 bytes).
NAIVE_PAYLOAD = "x" * 150
VERDICT = '{"status": "ok", "detail": "", "negotiated": 1}'
# Local calls: they change or read the client's timeout and send nothing.
LOCAL_CALLS = frozenset({"set_timeout", "timeout"})
# TCPStore's get and multi_get first wait for their keys (one WAIT request),
# then fetch them: two requests on the wire for one call.
TWO_REQUEST_CALLS = frozenset({"get", "multi_get"})
# Connect this many clients at once: DNS stalls on connect (see the docs) overlap.
CONNECT_WORKERS = 32


def floor_barrier(store: dist.Store, rank: int, world_size: int) -> None:
    """The floor: the cheapest barrier a store can do (one add, one wait)."""
    store_barrier(store, world_size)


def guardrail_check(store: dist.Store, rank: int, world_size: int) -> None:
    """The check as frameworks call it (``init_process_group`` runs the same code)."""
    check_protocol_version(store, rank, world_size, TIMEOUT, backend="bench")


def naive_all_read(store: dist.Store, rank: int, world_size: int) -> None:
    """A naive design: publish, then read every other rank's key.

    It reads them with one ``multi_get`` (as a store-based all-gather does), the
    fastest form of the naive design, and skips parsing them: a lower bound on
    what a naive check would cost, O(N) keys per rank and O(N^2) in total.
    """
    store.set(f"rank/{rank}", NAIVE_PAYLOAD)
    store.multi_get([f"rank/{other}" for other in range(world_size) if other != rank])


def check_traffic(store: dist.Store, rank: int, world_size: int) -> None:
    """The store calls of the check on a fresh namespace (its usual case), and nothing else.

    For profiling only: compared with the real check it shows how much of the
    check's time is its store traffic and how much its Python work.
    """
    wait = timedelta(seconds=60)
    slots = [f"rank/{r}" for r in range(world_size)]
    if rank == 0:
        store.check([slots[0]])
        store.set(slots[0], NAIVE_PAYLOAD)
        store.wait(slots[1:], wait)
        store.multi_get(slots[1:])
        store.multi_set(slots[1:], [JUDGED] * (world_size - 1))
        store.set("verdict", VERDICT)
        return
    store.set(slots[rank], NAIVE_PAYLOAD)
    store.wait(["verdict"], wait)
    store.get("verdict")
    store.check([slots[rank]])
    store.get(slots[rank])
    store.delete_key(slots[rank])
    if store.add("read", 1) == world_size - 1:
        for key in ("verdict", "read", slots[0]):
            store.delete_key(key)


Body = Callable[[dist.Store, int, int], None]
# The N at which the brief sets the ratio target; the profiling variants run there.
TARGET_N = 1024
FLOOR = "barrier (floor)"
CHECK = "guardrail check"
NAIVE = "naive all-read"
VARIANTS: dict[str, Body] = {
    FLOOR: floor_barrier,
    CHECK: guardrail_check,
    NAIVE: naive_all_read,
}
# Run beside the others at the target N only, to show where the check's time goes.
PROFILE_VARIANTS: dict[str, Body] = {"check's store calls only": check_traffic}


class CountingStore(dist.Store):
    """Delegates every call to ``inner`` and counts calls and keys touched.

    Used only in the counting pass: the timed passes use plain clients, so the
    Python dispatch here never inflates a time.
    """

    def __init__(self, inner: dist.Store) -> None:
        super().__init__()
        self._inner = inner
        self.calls: Counter[str] = Counter()
        self.keys = 0

    def _count(self, name: str, keys: int = 1) -> None:
        self.calls[name] += 1
        if name not in LOCAL_CALLS:
            self.keys += keys

    def set(self, key: str, value: Any) -> None:
        self._count("set")
        self._inner.set(key, value)

    def get(self, key: str) -> bytes:
        self._count("get")
        return self._inner.get(key)

    def add(self, key: str, amount: int) -> int:
        self._count("add")
        return self._inner.add(key, amount)

    def compare_set(self, key: str, expected: Any, desired: Any) -> bytes:
        self._count("compare_set")
        return self._inner.compare_set(key, expected, desired)

    def wait(self, keys: list[str], *timeout: timedelta) -> None:
        self._count("wait", len(keys))
        self._inner.wait(keys, *timeout)

    def check(self, keys: list[str]) -> bool:
        self._count("check", len(keys))
        return self._inner.check(keys)

    def multi_get(self, keys: list[str]) -> list[bytes]:
        self._count("multi_get", len(keys))
        return self._inner.multi_get(keys)

    def multi_set(self, keys: list[str], values: list[Any]) -> None:
        self._count("multi_set", len(keys))
        self._inner.multi_set(keys, values)

    def delete_key(self, key: str) -> bool:
        self._count("delete_key")
        return self._inner.delete_key(key)

    def num_keys(self) -> int:
        self._count("num_keys")
        return self._inner.num_keys()

    def set_timeout(self, timeout: timedelta) -> None:
        self._count("set_timeout")
        self._inner.set_timeout(timeout)

    @property
    def timeout(self) -> timedelta:
        self._count("timeout")
        return self._inner.timeout

    def round_trips(self) -> int:
        """Store calls that reach the server."""
        return sum(n for name, n in self.calls.items() if name not in LOCAL_CALLS)

    def requests(self) -> int:
        """Requests on the wire (TCPStore's get and multi_get send two)."""
        return self.round_trips() + sum(self.calls[name] for name in TWO_REQUEST_CALLS)


def _new_client(port: int) -> dist.TCPStore:
    return dist.TCPStore(
        "127.0.0.1", port, None, False, TIMEOUT, wait_for_workers=False, use_libuv=True
    )


@dataclass
class Cluster:
    """One libuv TCPStore server and N connected clients (one per simulated rank)."""

    server: dist.TCPStore
    clients: list[dist.TCPStore]
    connect_seconds: float

    @classmethod
    def build(cls, world_size: int) -> Cluster:
        started = time.perf_counter()
        server = dist.TCPStore(
            "127.0.0.1", 0, None, True, TIMEOUT, wait_for_workers=False, use_libuv=True
        )
        with ThreadPoolExecutor(CONNECT_WORKERS) as pool:
            clients = list(pool.map(_new_client, [server.port] * world_size))
        return cls(server, clients, time.perf_counter() - started)


@dataclass
class Timing:
    wall: float  # seconds from the release of the threads to the last one's return
    cpu: float  # process CPU seconds over the same span (all threads, server included)


def run_ranks(stores: Sequence[dist.Store], body: Callable[[dist.Store, int, int], None]) -> Timing:
    """Run ``body(store, rank, N)`` on N threads released together; time to the last return."""
    threads = RankThreads(len(stores), TIMEOUT.total_seconds(), body)
    outcomes = threads.start(dict(enumerate(stores)), together=True).join()
    cpu_end = time.process_time()
    errors = [outcome.exception for outcome in outcomes.values() if outcome.exception is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} simulated ranks failed; first: {errors[0]!r}")
    finished = max(outcome.finished for outcome in outcomes.values())
    return Timing(finished - threads.released_wall, cpu_end - threads.released_cpu)


def _prefixed(cluster: Cluster, prefix: str) -> list[dist.Store]:
    return [dist.PrefixStore(prefix, client) for client in cluster.clients]


@dataclass
class ScaleResult:
    world_size: int
    reps: int
    connect_seconds: float
    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    ratio: dict[str, list[float]] = field(default_factory=dict)  # per repetition, to the floor
    counts: dict[str, list[CountingStore]] = field(default_factory=dict)


def naive_reps(world_size: int, reps: int) -> int:
    """The naive design is O(N^2) keys: seconds per run at N=1024, most of a minute
    at N=2048 on this machine, where one run is enough to show it."""
    if world_size <= 256:
        return reps
    return min(reps, 3 if world_size <= 1024 else 1)


def measure(world_size: int, reps: int, profile: bool = False) -> ScaleResult:
    """A warm-up, interleaved timed repetitions, then one counting pass per variant."""
    variants = {**VARIANTS, **(PROFILE_VARIANTS if profile else {})}
    cluster = Cluster.build(world_size)
    result = ScaleResult(world_size, reps, cluster.connect_seconds)
    for name in (FLOOR, CHECK):  # first calls pay one-off costs (imports, allocations)
        run_ranks(_prefixed(cluster, f"warmup/{name}"), variants[name])
    for rep in range(reps):
        names = [n for n in variants if n != NAIVE or rep < naive_reps(world_size, reps)]
        # Rotate the order so no variant always runs first (or last) in a repetition.
        order = names[rep % len(names) :] + names[: rep % len(names)]
        timings = {
            name: run_ranks(_prefixed(cluster, f"bench/{rep}/{name}"), variants[name])
            for name in order
        }
        for name, timing in timings.items():
            result.wall.setdefault(name, []).append(timing.wall)
            result.cpu.setdefault(name, []).append(timing.cpu)
            result.ratio.setdefault(name, []).append(timing.wall / timings[FLOOR].wall)
    for name, body in variants.items():
        counters = [CountingStore(store) for store in _prefixed(cluster, f"count/{name}")]
        run_ranks(counters, body)
        result.counts[name] = counters
    return result


def _per_rank(counters: Sequence[CountingStore], metric: Callable[[CountingStore], int]) -> str:
    values = [metric(c) for c in counters]
    return f"{max(values)}/{sum(values) / len(values):.1f}/{values[0]}"


def _row(res: ScaleResult, name: str) -> list[object]:
    counters = res.counts[name]
    return [
        res.world_size,
        name,
        len(res.wall[name]),
        f"{median(res.wall[name]) * 1e3:.1f}",
        f"{median(res.ratio[name]):.2f}",
        f"{min(res.ratio[name]):.2f}-{max(res.ratio[name]):.2f}",
        f"{median(res.cpu[name]) * 1e6 / res.world_size:.0f}",
        _per_rank(counters, CountingStore.round_trips),
        _per_rank(counters, CountingStore.requests),
        _per_rank(counters, lambda c: c.keys),
    ]


HEADERS = [
    "N",
    "variant",
    "reps",
    "median ms",
    "x floor",
    "x range",
    "CPU us/rank",
    "calls max/mean/r0",
    "wire max/mean/r0",
    "keys max/mean/r0",
]


def table(results: Sequence[ScaleResult]) -> str:
    return format_table(HEADERS, [_row(res, name) for res in results for name in VARIANTS])


def _remote_calls(counter: CountingStore) -> Counter[str]:
    return Counter({k: n for k, n in counter.calls.items() if k not in LOCAL_CALLS})


def profile_table(results: Sequence[ScaleResult]) -> str:
    """The profiling variants at the N where they ran, under the floor and the check.

    Says so when the module's calls no longer match :func:`check_traffic` (the
    module changed), since the breakdown then describes another protocol.
    """
    profiled = [res for res in results if PROFILE_VARIANTS.keys() <= res.wall.keys()]
    rows = [_row(res, name) for res in profiled for name in (FLOOR, CHECK, *PROFILE_VARIANTS)]
    out = format_table(HEADERS, rows)
    for res in profiled:
        mirror = res.counts[next(iter(PROFILE_VARIANTS))]
        real = res.counts[CHECK]
        if any(_remote_calls(m) != _remote_calls(r) for m, r in zip(mirror[:2], real[:2])):
            out += "\nWARNING: the check's store calls differ from check_traffic(): update it."
    return out


def call_breakdown(results: Sequence[ScaleResult]) -> str:
    """Which store calls each variant makes, for rank 0 and for any other rank."""
    res = max(results, key=lambda r: len(r.counts))
    lines = [f"store calls by kind at N={res.world_size} (rank 0 | rank 1):"]
    width = max(map(len, res.counts))
    for name, counters in res.counts.items():
        lines.append(f"  {name:{width}} {dict(counters[0].calls)} | {dict(counters[1].calls)}")
    return "\n".join(lines)


def targets(results: Sequence[ScaleResult], target_n: int = TARGET_N) -> list[Target]:
    out = []
    for res in results:
        if res.world_size == target_n:
            ratio = median(res.ratio[CHECK])
            out.append(
                Target(f"check / barrier at N={target_n}", f"{ratio:.2f}x", "<= 1.5x", ratio <= 1.5)
            )
    # Round trips per non-coordinating rank must not grow with N; rank 0's must not either.
    check = [res.counts[CHECK] for res in results]
    worst = [max(c.round_trips() for c in counters) for counters in check]
    others = [max(c.round_trips() for c in counters[1:]) for counters in check]
    constant = len(set(worst)) == 1 and len(set(others)) == 1
    sizes = ",".join(str(res.world_size) for res in results)
    out.append(
        Target(
            f"store round trips per rank constant in N (N={sizes})",
            f"max {worst}, non-zero ranks {others}",
            "same for every N",
            constant,
        )
    )
    return out
