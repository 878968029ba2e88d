"""Benchmark 5: the torchrun agents' check, against torchrun's own rendezvous.

What runs. Every round is a real c10d rendezvous of N torchrun agents, each a
real ``LocalElasticAgent`` with its own ``DynamicRendezvousHandler`` (from
``rendezvous.registry.get_rendezvous_handler`` with ``backend="c10d"``,
``min_nodes = max_nodes = N``, a fresh run id and a fresh free port; agent 0
hosts the c10d store, ``is_host=True``, the others connect to it, ``is_host=False``).
Each agent runs the agent's own ``SimpleElasticAgent._rendezvous``, the method
the hook patches: ``next_rendezvous()``, the check, ``_assign_worker_ranks``
(``TORCH_ELASTIC_WORKER_IDENTICAL`` unset, torchrun's default: the role_info
exchange). No worker is started: what follows ``_rendezvous`` is the same with
the check on or off.

The agents are threads of this process, released together by one
``threading.Barrier`` (``RankThreads``). 32 torchrun processes on this 2-core
machine would time interpreter start-up, not the rendezvous; threads share one
GIL, so the agents' Python work is serialised here where real agents run it in
parallel on their own hosts (an upper bound for the check's Python share).
Building the handlers and agents (the store connections) is not timed. At most
32 agents: the rendezvous of 64 threads took 50 s on stock torch 2.13 here (32:
2.6 s), and the fork's rounds with the check off passed its 120 s join timeout
(RendezvousTimeoutError). At 48, three interleaved pairs took 10.0, 12.4, 13.3 s on
stock and 13.0, 10.0, 10.5 s on the fork with the check off (2026-12-07, at
`524c5a8`): the threads' rendezvous itself, not the check.

Stock against patched, side by side: each repetition runs two rounds back to
back, in alternating order: "stock" with ``TORCH_DISTRIBUTED_PROTOCOL_CHECK=off``
(the hook row returns after reading the variable: the stock agent's path, plus
microseconds) and "patched" with the check on (``error``, the default).
``_agent.check_agent_protocol_version`` is wrapped for the round to take the time
at its entry and return (the hook imports it from the module at each call); a
round whose N agents did not all pass through it stops the benchmark (no hook).

Figures of a round, from the release of the N agents:

* rdzv: to the last agent's return from ``next_rendezvous()`` (the entry of the
  hook row). The c10d rendezvous polls its state once a second, and the first
  round of a handler waits 0-0.3 s at random first: agents leave it spread out.
* check: from that last return to the last agent's return from the check, that
  is what the check adds to the path to the workers' start (agents that left the
  rendezvous early wait in the check for the late ones, as they wait in
  ``_assign_worker_ranks`` on stock).
* assign: from there to the last agent's return from ``_rendezvous``.
* total: release to the last return from ``_rendezvous``.

Then, untimed for the round, the same agents (their round stores, their group
ranks) run three bodies released together, interleaved, each on a fresh prefix
of the round's store: the store barrier (the floor), the real
``_assign_worker_ranks`` (stock's next step) and the real check. That is the
check's own cost without the rendezvous' spread. A last pass, on the first
repetition, counts the check's store calls per agent (``CountingStore``).

What to look for beside the medians: every agent blocks on the store until the
keys it waits for are there (rank 0 for every payload, the others for the
verdict), as ``_assign_worker_ranks`` does, so check max follows the spread of
the agents' exits from the rendezvous, not a polling period.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from collections.abc import Callable, Sequence
from unittest import mock

import torch.distributed as dist
from torch.distributed._protocol_version import _agent, CHECK_MODE_ENV
from torch.distributed.elastic.agent.server.api import WorkerSpec
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.elastic.rendezvous import RendezvousConnectionError, RendezvousParameters
from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler
from torch.testing._internal.common_utils import find_free_port
from torch.testing._internal.distributed.protocol_version_utils import RankThreads

from _bench_common import format_table, median
from _bench_store_scale import CONNECT_WORKERS, CountingStore, floor_barrier, run_ranks


AGENT_SIZES = (2, 8, 32)
STOCK, PATCHED = "stock", "patched"
# What torchrun passes by default (join 600 s) would turn a stuck round into ten minutes.
JOIN_TIMEOUT_S = 120
FLOOR, ASSIGN, CHECK = "barrier", "assign", "check"
# The real check as the hook calls it, kept before any round wraps the module's name.
_REAL_CHECK = _agent.check_agent_protocol_version


def _handler(port: int, run_id: str, world_size: int, is_host: bool):
    params = RendezvousParameters(
        backend="c10d",
        endpoint=f"127.0.0.1:{port}",
        run_id=run_id,
        min_nodes=world_size,
        max_nodes=world_size,
        local_addr="127.0.0.1",  # torchrun's --local-addr: no FQDN lookup per agent
        join_timeout=JOIN_TIMEOUT_S,
        is_host=is_host,
    )
    return get_rendezvous_handler(params)


def _agent_for(handler) -> LocalElasticAgent:
    spec = WorkerSpec(
        role="trainer", local_world_size=1, rdzv_handler=handler, entrypoint=sys.executable,
        args=("-c", "pass"), max_restarts=0,
    )
    return LocalElasticAgent(spec, DefaultLogsSpecs(log_dir=os.devnull), start_method="spawn")


def _build_agents(world_size: int, run_id: str) -> list[LocalElasticAgent]:
    """N agents on a fresh port: agent 0 hosts the c10d store, as the node at the endpoint."""
    for attempt in range(3):  # the free port may be taken before agent 0 binds it
        port = find_free_port()
        try:
            first = _handler(port, run_id, world_size, True)
            break
        except RendezvousConnectionError:
            if attempt == 2:
                raise
    with ThreadPoolExecutor(CONNECT_WORKERS) as pool:
        rest = list(pool.map(lambda _: _handler(port, run_id, world_size, False), range(world_size - 1)))
    return [_agent_for(h) for h in [first, *rest]]


@dataclass
class RoundTimes:
    rdzv: float
    spread: float  # first to last agent's return from next_rendezvous()
    check: float
    assign: float
    total: float


class _HookClock:
    """Wraps the check the hook calls, to time its entry and return per group rank."""

    def __init__(self) -> None:
        self.entered: dict[int, float] = {}
        self.left: dict[int, float] = {}

    def __call__(self, store: dist.Store, group_rank: int, group_world_size: int, rdzv_backend: str,
                 args: tuple[object, ...] = ()) -> None:
        self.entered[group_rank] = time.monotonic()
        try:
            _REAL_CHECK(store, group_rank, group_world_size, rdzv_backend, args)
        finally:
            self.left[group_rank] = time.monotonic()


def _run_round(agents: Sequence[LocalElasticAgent], mode: str) -> RoundTimes:
    """One rendezvous round through ``SimpleElasticAgent._rendezvous``, check in ``mode``."""
    world_size = len(agents)
    clock = _HookClock()
    threads = RankThreads(world_size, JOIN_TIMEOUT_S, lambda agent, i, n: agent._rendezvous(agent.get_worker_group()))
    with ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, {CHECK_MODE_ENV: mode}))
        stack.enter_context(mock.patch.object(_agent, "check_agent_protocol_version", clock))
        # RankThreads hands each thread the object it is given for its "store": here the agent.
        outcomes = threads.start(dict(enumerate(agents)), together=True).join()
    errors = [o.exception for o in outcomes.values() if o.exception is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} of {world_size} agents failed; first: {errors[0]!r}")
    if len(clock.left) != world_size:
        raise RuntimeError(
            f"{len(clock.left)} of {world_size} agents passed through the hook row of "
            "SimpleElasticAgent._rendezvous: is the hook in place? (make hooked)"
        )
    released = threads.released_wall
    last_rdzv, last_check = max(clock.entered.values()), max(clock.left.values())
    last_done = max(o.finished for o in outcomes.values())
    spread = last_rdzv - min(clock.entered.values())
    return RoundTimes(
        last_rdzv - released, spread, last_check - last_rdzv, last_done - last_check, last_done - released
    )


def _isolated_bodies(agents: Sequence[LocalElasticAgent]) -> dict[str, Callable[[dist.Store, int, int], None]]:
    by_rank = {a.get_worker_group().group_rank: a for a in agents}
    spec = agents[0].get_worker_group().spec

    def assign(store: dist.Store, rank: int, world_size: int) -> None:
        by_rank[rank]._assign_worker_ranks(store, rank, world_size, spec)

    def check(store: dist.Store, rank: int, world_size: int) -> None:
        _REAL_CHECK(store, rank, world_size, "c10d")

    return {FLOOR: floor_barrier, ASSIGN: assign, CHECK: check}


def _round_stores(agents: Sequence[LocalElasticAgent], prefix: str, wrap=lambda s: s) -> list[dist.Store]:
    """Each agent's own client of the round's store, ordered by group rank."""
    groups = sorted((a.get_worker_group() for a in agents), key=lambda g: g.group_rank)
    return [wrap(dist.PrefixStore(prefix, g.store)) for g in groups]


def _isolated(agents: Sequence[LocalElasticAgent], walls: dict[str, list[float]]) -> None:
    bodies = _isolated_bodies(agents)
    names = list(bodies)
    turn = len(walls[CHECK]) % len(names)  # rotate the order from round to round
    with mock.patch.dict(os.environ, {CHECK_MODE_ENV: "error"}):
        for name in names[turn:] + names[:turn]:
            walls[name].append(run_ranks(_round_stores(agents, f"bench/isolated/{name}"), bodies[name]).wall)


def _count_check_calls(agents: Sequence[LocalElasticAgent]) -> list[CountingStore]:
    counters = _round_stores(agents, "bench/count", CountingStore)
    with mock.patch.dict(os.environ, {CHECK_MODE_ENV: "error"}):
        run_ranks(counters, _isolated_bodies(agents)[CHECK])
    return counters


def _shutdown(agents: Sequence[LocalElasticAgent]) -> None:
    """What torchrun does when its agent ends: close the rendezvous, stop the heartbeats."""
    for agent in agents:
        agent.get_worker_group().spec.rdzv_handler.shutdown()


@dataclass
class AgentResult:
    world_size: int
    rounds: dict[str, list[RoundTimes]] = field(default_factory=lambda: {STOCK: [], PATCHED: []})
    isolated: dict[str, list[float]] = field(default_factory=lambda: {FLOOR: [], ASSIGN: [], CHECK: []})
    counts: list[CountingStore] = field(default_factory=list)
    setup_seconds: float = 0.0


def measure(world_size: int, reps: int) -> AgentResult:
    result = AgentResult(world_size)
    modes = {STOCK: "off", PATCHED: "error"}
    for rep in range(reps):
        order = [STOCK, PATCHED] if rep % 2 == 0 else [PATCHED, STOCK]
        for variant in order:
            started = time.perf_counter()
            agents = _build_agents(world_size, f"bench-agents-{world_size}-{rep}-{variant}-{os.getpid()}")
            result.setup_seconds += time.perf_counter() - started
            try:
                result.rounds[variant].append(_run_round(agents, modes[variant]))
                _isolated(agents, result.isolated)
                if rep == 0 and variant == PATCHED:
                    result.counts = _count_check_calls(agents)
            finally:
                _shutdown(agents)
    return result


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _range(values: Sequence[float], digits: int = 2) -> str:
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}"


def _med_max(values: Sequence[float]) -> str:
    return f"{_ms(median(values))}/{_ms(max(values))}"


def round_table(results: Sequence[AgentResult]) -> str:
    rows = []
    for res in results:
        stock = res.rounds[STOCK]
        for variant, rounds in res.rounds.items():
            patched = variant == PATCHED
            paired = [p.total / s.total for p, s in zip(rounds, stock)]
            rows.append(
                [
                    res.world_size,
                    variant,
                    len(rounds),
                    _ms(median([r.rdzv for r in rounds])),
                    _med_max([r.spread for r in rounds]),
                    _med_max([r.check for r in rounds]),
                    _ms(median([r.assign for r in rounds])),
                    _ms(median([r.total for r in rounds])),
                    f"{median([r.check / r.rdzv for r in rounds]):.4f}" if patched else "-",
                    f"{median([(r.rdzv + r.check) / r.rdzv for r in rounds]):.4f}" if patched else "-",
                    f"{median(paired):.2f}" if patched else "-",
                    _range(paired) if patched else "-",
                ]
            )
    headers = [
        "N", "round", "rounds", "rdzv ms", "spread ms med/max", "check ms med/max", "assign ms", "total ms",
        "check/rdzv", "(rdzv+check)/rdzv", "total x stock", "x range",
    ]
    return format_table(headers, rows)


def isolated_table(results: Sequence[AgentResult]) -> str:
    rows = []
    for res in results:
        walls = res.isolated
        x_floor = [c / b for c, b in zip(walls[CHECK], walls[FLOOR])]
        x_assign = [c / a for c, a in zip(walls[CHECK], walls[ASSIGN])]
        calls = [c.round_trips() for c in res.counts]
        rows.append(
            [
                res.world_size,
                len(walls[CHECK]),
                _ms(median(walls[FLOOR])),
                _ms(median(walls[ASSIGN])),
                _ms(median(walls[CHECK])),
                f"{median(x_floor):.2f}",
                _range(x_floor),
                f"{median(x_assign):.2f}",
                f"{max(calls[1:])}/{calls[0]}" if calls else "-",
            ]
        )
    headers = [
        "N", "reps", "barrier ms", "assign ms", "check ms", "check x barrier", "x range", "check x assign",
        "check calls other/r0",
    ]
    return format_table(headers, rows)


def bench(sizes: Sequence[int], reps: int, log: Callable[[str], None]) -> list[AgentResult]:
    results = []
    for world_size in sizes:
        started = time.perf_counter()
        results.append(measure(world_size, reps))
        log(
            f"  N={world_size}: {reps} x 2 rounds in {time.perf_counter() - started:.1f}s "
            f"(building the agents took {results[-1].setup_seconds:.1f}s, not timed)"
        )
    return results
