"""Benchmarks of the torch.distributed protocol version guardrail (``make bench``).

1. Check cost at scale: N simulated ranks (threads, one TCPStore client each, one
   libuv server) run only the check, beside a plain store barrier (the floor) and
   a naive design in which every rank reads every other rank's key.
2. Init overhead: ``init_process_group`` + ``destroy_process_group`` with gloo and
   2, 4, 8 spawned ranks, check on against check off, interleaved.
3. Time to verdict on a mismatch: from the last rank's arrival in
   ``init_process_group`` to the last rank's RuntimeError, timeout 300 s, with the
   odd rank (the last rank, then rank 0) 0, 1.3, 1.7 and 3.1 s late.
4. The cluster preflight (``--preflight``) at N = 64, 256, 1024 simulated ranks
   (threads, as in 1), against the same store barrier.
5. torchrun's agents: the check the hook runs in ``SimpleElasticAgent._rendezvous``
   at 2, 8, 32 agents (threads, real c10d rendezvous on a free port), against the
   rendezvous itself; rounds with the check off (stock's path) and on alternate.
6. A stock node under torchrun: two real torchruns, a stock node beside a node
   on the guardrail, against two stock nodes, workers on a backend without a trace.

Each benchmark runs its variants side by side in the same run and reports medians
and ratios: absolute times on a shared machine are noise. Results and the machine
note live in docs/source/protocol_version_benchmarks.md.

Usage: bench_protocol_version.py [--quick] [--only 1,3] [--sizes 64,256] [--agent-sizes 2,8,32]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


# Set before torch is imported (and inherited by the spawned ranks). Every TCPStore
# connection makes c10d look up the peer's name; this machine's resolver drops some
# of those reverse lookups, and glibc's default (5 s timeout, 2 attempts) turns each
# drop into a long stall while connecting thousands of clients. Nothing timed here
# connects, but the set-up would take minutes. The failed lookups only cost a log
# line, which the C++ log level below keeps quiet.
os.environ.setdefault("RES_OPTIONS", "timeout:1 attempts:1")
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

import argparse
import datetime
import platform
import resource
import threading
import time

import torch

import _bench_agents
import _bench_init
import _bench_preflight
import _bench_store_scale
import _bench_torchrun
from _bench_common import Target


SCALE_SIZES = (64, 256, 1024, 2048)
PREFLIGHT_SIZES = (64, 256, 1024)
INIT_SIZES = (2, 4, 8)
AGENT_SIZES = _bench_agents.AGENT_SIZES


def _parse_ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _machine_note() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{datetime.datetime.now().isoformat(timespec='seconds')}  torch {torch.__version__}  "
        f"python {platform.python_version()}  {os.cpu_count()} CPUs  load average {load}"
    )


def _prepare_for_many_threads(largest: int) -> None:
    """One thread and two sockets (client and server end) per simulated rank."""
    threading.stack_size(512 * 1024)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * largest + 256
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def bench_scale(sizes: list[int], reps: int) -> list[Target]:
    print("\n## 1. Check cost at scale (threads, one TCPStore client each, libuv server)")
    _prepare_for_many_threads(max(sizes))
    results = []
    for world_size in sizes:
        started = time.perf_counter()
        profile = world_size == _bench_store_scale.TARGET_N
        results.append(_bench_store_scale.measure(world_size, reps, profile))
        print(
            f"  N={world_size}: {reps} interleaved repetitions in "
            f"{time.perf_counter() - started:.1f}s (connecting took "
            f"{results[-1].connect_seconds:.1f}s, not timed)",
            flush=True,
        )
    print()
    print(_bench_store_scale.table(results))
    print(
        "\nmedian ms: release of the N threads to the last return; x floor: median of the "
        "per-repetition ratios to the barrier (x range: min-max);\nCPU us/rank: process CPU "
        "(all threads and the in-process server) / N; calls: store calls that reach the "
        "server,\nwire: requests sent (get and multi_get are a WAIT plus a fetch); keys: "
        "keys read or written; max/mean over ranks, then rank 0."
    )
    profiled = _bench_store_scale.profile_table(results)
    if profiled.count("\n") > 1:
        print(
            "\nwhere the check's time goes: the check's store calls alone (fresh store, no "
            "JSON, no checks), same repetitions:\n"
        )
        print(profiled)
    print()
    print(_bench_store_scale.call_breakdown(results))
    return _bench_store_scale.targets(results)


def bench_init(sizes: list[int], spawns: int, pairs: int) -> list[Target]:
    print("\n## 2. init_process_group + destroy_process_group overhead (gloo, spawned ranks)")
    results = []
    for world_size in sizes:
        started = time.perf_counter()
        results.append(_bench_init.measure_init(world_size, spawns, pairs))
        print(
            f"  {world_size} ranks: {spawns} spawns x {pairs} on/off pairs in "
            f"{time.perf_counter() - started:.1f}s",
            flush=True,
        )
    print()
    print(_bench_init.init_table(results))
    print(
        "\nper cycle: max over ranks of the time around init + destroy (after a store "
        "barrier); medians over cycles;\npaired: median of on/off ratios of adjacent "
        "cycles (order alternates); check ms: the check's own log line, max over ranks."
    )
    return _bench_init.init_targets(results)


# How late the odd rank arrives: inside the grace period (1 s) and past it, at
# times that are no multiple of any look period.
VERDICT_DELAYS = (0.0, 1.3, 1.7, 3.1)


def bench_verdict(world_size: int, trials: int, delays: tuple[float, ...]) -> list[Target]:
    print("\n## 3. Time to verdict on a mismatch (timeout 300 s, odd rank late on purpose)")
    results = []
    for delay in delays:
        for late_rank in (world_size - 1, 0):
            started = time.perf_counter()
            results.append(_bench_init.measure_verdict(world_size, late_rank, trials, delay))
            took = time.perf_counter() - started
            print(f"  rank {late_rank} {delay:g}s late: {trials} trials in {took:.1f}s", flush=True)
    print()
    print(_bench_init.verdict_table(results))
    print(
        "\nper trial: last RuntimeError minus the last arrival in init_process_group (the odd rank, on protocol "
        "version 2, sleeps the delay after a store barrier; at 0 s any rank may arrive last)."
    )
    return _bench_init.verdict_targets(results)


def bench_preflight(sizes: list[int], reps: int) -> None:
    print("\n## 4. Cluster preflight at scale (threads, one TCPStore client each, libuv server)")
    _prepare_for_many_threads(max(sizes))
    started = time.perf_counter()
    print(_bench_preflight.bench(sizes, reps))
    print(
        f"\n{reps} interleaved repetitions per N in {time.perf_counter() - started:.1f}s; medians; "
        "x barrier: median of the per-repetition ratios\n(x range: min-max). The preflight "
        "includes rank 0 reading every payload back and rendering the table."
    )


def bench_agents(sizes: list[int], reps: int) -> None:
    print("\n## 5. torchrun agents: the check in SimpleElasticAgent._rendezvous vs the c10d rendezvous")
    _prepare_for_many_threads(max(sizes))
    started = time.perf_counter()
    results = _bench_agents.bench(sizes, reps, lambda line: print(line, flush=True))
    print()
    print(_bench_agents.round_table(results))
    print(
        f"\n{reps} repetitions of a stock round (check off: the hook row returns at once) and a patched "
        "round (check on), order\nalternating; each a fresh c10d rendezvous of N agent threads through "
        "the real SimpleElasticAgent._rendezvous.\nTimes from the release of the agents to the last "
        "agent through each step, medians over rounds: rdzv\n(next_rendezvous), check (from the last "
        "rdzv return), assign (_assign_worker_ranks), total; spread: first to last\nagent out of the "
        "rendezvous. check/rdzv, (rdzv+check)/rdzv: per round; total x stock: patched total over the "
        "stock\ntotal of the same repetition (mostly the rendezvous' own noise; x range: min-max).\n"
    )
    print(_bench_agents.isolated_table(results))
    print(
        "\nafter each round, its agents released together on the round's store, interleaved: "
        "the store barrier, the real\n_assign_worker_ranks (stock's next step), the real check; "
        "medians, x: median of per-repetition ratios;\ncalls: the check's store calls per agent "
        f"(max over agents other than 0 / agent 0). Benchmark 5 took {time.perf_counter() - started:.0f}s."
    )


def bench_torchrun(reps: int) -> list[Target]:
    print("\n## 6. A stock node under torchrun: the job's start beside a node on the guardrail vs all stock")
    started = time.perf_counter()
    result = _bench_torchrun.measure(reps)
    print(_bench_torchrun.table(result))
    print(
        f"\n{reps} repetitions, the two jobs alternating; start: the launch of both torchruns to the last worker's "
        "first all_reduce\n(workers on a backend without a trace); added: one stock minus all stock, per "
        f"repetition. Benchmark 6 took {time.perf_counter() - started:.0f}s."
    )
    return _bench_torchrun.targets(result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    parser.add_argument("--only", type=_parse_ints, default=[1, 2, 3, 4, 5, 6], help="e.g. 1,3")
    parser.add_argument("--sizes", type=_parse_ints, help="N for benchmark 1")
    parser.add_argument("--reps", type=int, help="repetitions per N in benchmark 1")
    parser.add_argument("--agent-sizes", type=_parse_ints, help="agents per round in benchmark 5")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    print(f"# protocol version guardrail benchmarks\n{_machine_note()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    targets: list[Target] = []
    if 1 in args.only:
        sizes = args.sizes or ([64, 256, 1024] if args.quick else list(SCALE_SIZES))
        targets += bench_scale(sizes, args.reps or (3 if args.quick else 9))
    if 2 in args.only:
        targets += bench_init(
            [2, 8] if args.quick else list(INIT_SIZES),
            spawns=1 if args.quick else 2,
            pairs=4 if args.quick else 8,
        )
    if 3 in args.only:
        targets += bench_verdict(4, trials=2 if args.quick else 4, delays=VERDICT_DELAYS)
    if 4 in args.only:
        bench_preflight(list(PREFLIGHT_SIZES), reps=3 if args.quick else 7)
    if 5 in args.only:
        bench_agents(args.agent_sizes or list(AGENT_SIZES), reps=2 if args.quick else 5)
    if 6 in args.only:
        targets += bench_torchrun(reps=2 if args.quick else 5)

    print("\n## Targets")
    for target in targets:
        print(target.line())
    print(f"\ntotal {time.perf_counter() - started:.0f}s; finished {_machine_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
