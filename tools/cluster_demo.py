#!/usr/bin/env python3
"""`make cluster-demo`: the guardrail across three hosts, with a real build on each.

The hosts node-a, node-b and node-c are made on this machine (network, UTS and
mount namespaces: own hostname, own address, own /etc/hosts). Each runs a real
multi-node ``torchrun`` (c10d rendezvous on node-a) of a gloo job with the torch
of its own venv: the fork (this repo's .venv, protocol version 1), stock torch
(.venv-stock, no check), the fork's wheel rebuilt with other versions, or the
guardrail over torch 2.14.1 (.venv-2.14).

Act 1, a rolling update with real builds:
  1. every host on the fork: torchrun's agents check each other, the job runs;
  2. node-c straight to a version-2 build (minimum 2): torchrun's agents refuse
     before any worker starts, on every host;
  2b. the same hosts launched without the agents' check (the check off for
     torchrun, on in the workers): every worker fails in init_process_group;
  3. node-c on the bridging build (versions 1-2) instead: the job runs at 1;
  4. every host on the bridging build: the job runs at 2;
  5. node-c on the next torch release, 2.14.1, with the guardrail (.venv-2.14):
     both releases speak version 1, the job runs;
  5b. node-c's 2.14.1 announcing version 2: the agents refuse, naming it.
Act 2, the guardrail's own first rollout (node-c still on stock torch), the
workers on a backend that leaves no trace in the store at init, as NCCL:
  6. beside version-1 hosts: the job runs; the guardrail agents warn, naming
     node-c, and their workers take the agents' verdict (version 1);
  7. beside version-2 hosts: the guardrail agents refuse within seconds, before
     any worker starts; the stock agent fails once its store host has gone.

Needs root. The first run builds the two other builds' venvs (about 2 minutes);
later runs reuse them.
"""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Mapping

from torch.testing._internal.distributed.protocol_version_builds import build_venvs
from torch.testing._internal.distributed.protocol_version_utils import NEXT_VENV, REPO_ROOT, STOCK_PYTHON
from torch.testing._internal.distributed.protocol_version_cluster import (
    Cluster,
    Host,
    Job,
    run_job,
    unavailable_reason,
)


FORK = REPO_ROOT / ".venv"
VERSION_OVERRIDE_ENV = "TORCH_DISTRIBUTED_PROTOCOL_VERSION_OVERRIDE"
STOCK = STOCK_PYTHON.parents[1]
NO_CHECK = "without the protocol version check"
AGENT_TITLE = "torch.distributed protocol version (torchrun agents)"
CHECK_MODE_ENV = "TORCH_DISTRIBUTED_PROTOCOL_CHECK"
# How long a stock host that keeps waiting is watched in step 7.
STOCK_BOUND_S = 45.0
# The workers' backend in act 2: it leaves no key in the store before it starts, as NCCL.
TRACELESS = ["--backend", "traceless"]
# What a step is expected to show.
RAN, AGENTS_REFUSE, WORKERS_REFUSE = "the job runs", "the agents refuse", "the workers refuse"


@dataclass(frozen=True)
class Build:
    name: str
    venv: Path


def banner(title: str) -> None:
    print(f"\n{'=' * 78}\n{title}\n{'=' * 78}")


def describe(job: Job, host: Host) -> str:
    """What host's agent and worker did."""
    run = job.runs[host.index]
    done, failed = job.event(host, "done"), job.event(host, "init_failed")
    refused = job.raised(host, AGENT_TITLE)
    passed = job.logged(host, "agents passed")
    if refused is not None:
        left = job.left(host)
        after = f" {left - job.agents_arrival():.2f} s after the last agent's arrival" if left else ""
        what = f"agent refused ({refused.type}){after}, started no worker"
    elif done is not None:
        checked = "agent check passed; " if passed else ""
        what = f"{checked}all_reduce sum {done['sum']:g}, negotiated version {done['negotiated']}"
    elif failed is not None:
        after = failed["time"] - job.last_arrival()
        what = f"worker's init failed {after:.2f} s after the last arrival ({failed['error_type']})"
    elif job.event(host, "launched") is None:
        died = job.raised(host)
        what = f"no worker started{f'; torchrun died of {died.type}' if died else ''}"
    else:
        what = "the worker reported nothing more"
    exit_ = "still running, killed" if run.timed_out else f"torchrun exit {run.returncode}"
    return f"{what}; {exit_} after {run.wall_s:.1f} s"


def show(cluster: Cluster, builds: list[Build], job: Job) -> None:
    """One line per host: its build, group rank, and what its agent, worker and torchrun did."""
    for host, build in zip(cluster.hosts, builds):
        rank = job.group_rank(host)
        print(f"  {host.name} (agent {'?' if rank is None else rank}) [{build.name}]: {describe(job, host)}")


def first_error(cluster: Cluster, job: Job) -> str | None:
    """The guardrail's message: an agent's refusal, or else a worker's."""
    for host in cluster.hosts:
        refused = job.raised(host, AGENT_TITLE)
        if refused is not None:
            return refused.message
    failed = (job.event(h, "init_failed") for h in cluster.hosts)
    return next((e["error"] for e in failed if e is not None), None)


def as_expected(cluster: Cluster, job: Job, expect: str) -> bool:
    if expect == RAN:
        return all(job.event(h, "done") is not None for h in cluster.hosts)
    if expect == AGENTS_REFUSE:
        return not job.launched() and any(job.raised(h, AGENT_TITLE) for h in cluster.hosts)
    hosts = cluster.hosts
    return any(job.event(h, "init_failed") for h in hosts) and not any(job.event(h, "done") for h in hosts)


def step(
    cluster: Cluster,
    title: str,
    builds: list[Build],
    expect: str,
    bounds: Mapping[int, float] | None = None,
    **kwargs: Any,
) -> bool:
    """Run one job, show it, quote the guardrail's message; whether it went as expected."""
    banner(title)
    job = run_job(cluster, [b.venv for b in builds], bounds=bounds, **kwargs)
    show(cluster, builds, job)
    error = first_error(cluster, job)
    if error is not None:
        print("\n  The message (from the first host that raised it):\n")
        print(textwrap.indent(error, "    | "))
    else:
        show_warnings(cluster, job)
    return as_expected(cluster, job, expect)


def show_warnings(cluster: Cluster, job: Job) -> None:
    """The guardrail's warnings about builds without the check, as each host logged
    them (its agent's, then its worker's)."""
    for host in cluster.hosts:
        for line in job.logged(host, NO_CHECK):
            who = "agent" if AGENT_TITLE in line.text else "worker"
            print(f"\n  {host.name}'s {who} logged:\n    | {line.text}")


def main() -> int:
    reason = unavailable_reason()
    if reason is not None:
        print(f"cluster demo skipped: {reason}")
        return 0
    print("Preparing the other builds (reused when nothing changed) ...", flush=True)
    v2_venv, bridge_venv = build_venvs([(2, 2), (2, 1)])
    fork, stock = Build("fork, version 1", FORK), Build("stock torch, no check", STOCK)
    v2, bridge = Build("build protocolv2", v2_venv), Build("build protocolv1to2", bridge_venv)
    next_release = Build("the fork over torch 2.14.1, version 1", NEXT_VENV)
    with Cluster(3) as cluster:
        outcomes = {
            "1 all on the fork": step(cluster, "Act 1.1: every host on the fork", [fork] * 3, RAN),
            "2 node-c on version 2": step(
                cluster, "Act 1.2: node-c upgraded straight to version 2 (minimum 2): torchrun's agents check",
                [fork, fork, v2], AGENTS_REFUSE,
            ),
            "2b node-c on version 2, no agent check": step(
                cluster,
                f"Act 1.2b: the same, launched without the agents' check ({CHECK_MODE_ENV}=off for torchrun, "
                "error in the workers): the workers check at init",
                [fork, fork, v2], WORKERS_REFUSE,
                env={CHECK_MODE_ENV: "off"}, worker_args=["--check-mode", "error"],
            ),
            "3 node-c bridging": step(
                cluster, "Act 1.3: node-c on the bridging build (versions 1-2) instead", [fork, fork, bridge], RAN
            ),
            "4 all bridging": step(cluster, "Act 1.4: every host on the bridging build", [bridge] * 3, RAN),
            "5 node-c on torch 2.14.1": step(
                cluster, "Act 1.5: node-c on the next torch release, 2.14.1, with the guardrail",
                [fork, fork, next_release], RAN,
            ),
            "5b node-c's 2.14.1 on version 2": step(
                cluster, f"Act 1.5b: node-c's 2.14.1 announcing version 2 ({VERSION_OVERRIDE_ENV}=2)",
                [fork, fork, next_release], AGENTS_REFUSE, host_env={2: {VERSION_OVERRIDE_ENV: "2"}},
            ),
            "6 stock beside version 1": step(
                cluster, "Act 2.1: first rollout: node-c on stock torch, the others on version 1 (workers on a "
                "backend without a trace, as NCCL)",
                [fork, fork, stock], RAN, worker_args=TRACELESS,
            ),
            "7 stock beside version 2": step(
                cluster, "Act 2.2: first rollout: node-c on stock torch, the others on version 2 (minimum 2)",
                [v2, v2, stock], AGENTS_REFUSE, bounds={2: STOCK_BOUND_S}, worker_args=TRACELESS,
            ),
        }
    banner("Summary")
    for name, ok in outcomes.items():
        print(f"  {name}: {'as expected' if ok else 'NOT as expected'}")
    return 0 if all(outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
