#!/usr/bin/env python3
"""`make cluster-demo`: the guardrail across three hosts, with a real build on each.

The hosts node-a, node-b and node-c are made on this machine (network, UTS and
mount namespaces: own hostname, own address, own /etc/hosts). Each runs a real
multi-node ``torchrun`` (c10d rendezvous on node-a) of a gloo job with the torch
of its own venv: the fork (this repo's .venv, protocol version 1), stock torch
(.venv-stock, no check), or the fork's wheel rebuilt with other versions.

Act 1, a rolling update with real builds:
  1. every host on the fork;
  2. node-c straight to a version-2 build (minimum 2): every host fails at init;
  3. node-c on the bridging build (versions 1-2) instead: the job runs at 1;
  4. every host on the bridging build: the job runs at 2.
Act 2, the guardrail's own first rollout (node-c still on stock torch):
  5. beside version-1 hosts: the job runs, the guardrail hosts warn;
  6. beside version-2 hosts: the guardrail hosts fail within seconds.

Needs root. The first run builds the two other builds' venvs (about 2 minutes);
later runs reuse them.
"""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from torch.testing._internal.distributed.protocol_version_builds import build_venvs
from torch.testing._internal.distributed.protocol_version_utils import REPO_ROOT, STOCK_PYTHON
from torch.testing._internal.distributed.protocol_version_cluster import (
    Cluster,
    Job,
    run_job,
    unavailable_reason,
)


FORK = REPO_ROOT / ".venv"
STOCK = STOCK_PYTHON.parents[1]
NO_CHECK = "without the protocol version check"
# How long a stock host that keeps waiting is watched in step 6.
STOCK_BOUND_S = 45.0


@dataclass(frozen=True)
class Build:
    name: str
    venv: Path


def banner(title: str) -> None:
    print(f"\n{'=' * 78}\n{title}\n{'=' * 78}")


def show(cluster: Cluster, builds: list[Build], job: Job) -> None:
    """One line per host: its build, rank, and what its worker and torchrun did."""
    last = job.last_arrival()
    for host, build in zip(cluster.hosts, builds):
        run = job.runs[host.index]
        start, done, failed = (job.event(host, e) for e in ("start", "done", "init_failed"))
        rank = "?" if start is None else start["rank"]
        if done is not None:
            what = f"all_reduce sum {done['sum']:g}, negotiated version {done['negotiated']}"
        elif failed is not None:
            what = f"init failed {failed['time'] - last:.2f} s after the last arrival ({failed['error_type']})"
        else:
            what = "no report"
        exit_ = "still running, killed" if run.timed_out else f"torchrun exit {run.returncode}"
        print(f"  {host.name} rank {rank} [{build.name}]: {what}; {exit_} after {run.wall_s:.1f} s")


def first_error(cluster: Cluster, job: Job) -> str | None:
    failed = (job.event(h, "init_failed") for h in cluster.hosts)
    return next((e["error"] for e in failed if e is not None), None)


def step(
    cluster: Cluster,
    title: str,
    builds: list[Build],
    expect_ok: bool,
    bounds: Mapping[int, float] | None = None,
) -> bool:
    """Run one job, show it, quote the guardrail's message; whether it went as expected."""
    banner(title)
    job = run_job(cluster, [b.venv for b in builds], bounds=bounds)
    show(cluster, builds, job)
    ran = all(job.event(h, "done") is not None for h in cluster.hosts)
    error = first_error(cluster, job)
    if error is not None:
        print("\n  The message (from the first host that failed):\n")
        print(textwrap.indent(error, "    | "))
    else:
        show_warnings(cluster, job)
    return ran == expect_ok


def show_warnings(cluster: Cluster, job: Job) -> None:
    """The guardrail's warning about builds without the check, as each host logged it."""
    for host in cluster.hosts:
        for line in job.runs[host.index].output.splitlines():
            if NO_CHECK in line:
                # Drop the logger's prefix (level, time, pid, file:line).
                print(f"\n  {host.name} logged:\n    | {line.partition('] ')[2] or line}")


def main() -> int:
    reason = unavailable_reason()
    if reason is not None:
        print(f"cluster demo skipped: {reason}")
        return 0
    print("Preparing the other builds (reused when nothing changed) ...", flush=True)
    v2_venv, bridge_venv = build_venvs([(2, 2), (2, 1)])
    fork, stock = Build("fork, version 1", FORK), Build("stock torch, no check", STOCK)
    v2, bridge = Build("build protocolv2", v2_venv), Build("build protocolv1to2", bridge_venv)
    with Cluster(3) as cluster:
        outcomes = {
            "1 all on the fork": step(cluster, "Act 1.1: every host on the fork", [fork] * 3, True),
            "2 node-c on version 2": step(
                cluster, "Act 1.2: node-c upgraded straight to version 2 (minimum 2)", [fork, fork, v2], False
            ),
            "3 node-c bridging": step(
                cluster, "Act 1.3: node-c on the bridging build (versions 1-2) instead", [fork, fork, bridge], True
            ),
            "4 all bridging": step(cluster, "Act 1.4: every host on the bridging build", [bridge] * 3, True),
            "5 stock beside version 1": step(
                cluster, "Act 2.1: first rollout: node-c on stock torch, the others on version 1",
                [fork, fork, stock], True,
            ),
            "6 stock beside version 2": step(
                cluster, "Act 2.2: first rollout: node-c on stock torch, the others on version 2 (minimum 2)",
                [v2, v2, stock], False, bounds={2: STOCK_BOUND_S},
            ),
        }
    banner("Summary")
    for name, ok in outcomes.items():
        print(f"  {name}: {'as expected' if ok else 'NOT as expected'}")
    return 0 if all(outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
