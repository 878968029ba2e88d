# Owner(s): ["oncall: distributed"]
"""The guardrail on three hosts made on one machine, with real builds on each.

Every test runs a real multi-node job: ``torchrun --nnodes N --nproc-per-node 1
--rdzv-backend c10d`` on each of the first N hosts of a fresh :class:`Cluster`
(network, UTS and mount namespaces: own hostname, own address, own /etc/hosts),
the rendezvous on host 0, one worker per host (``protocol_version_cluster_worker.py``)
that reports first thing, then inits gloo, all_reduces and reports (or, with
``--no-init``, never calls ``init_process_group``). What a host runs is a real
build in its own venv:

* the fork: the environment running these tests (``.venv``, the hooks installed);
* stock torch: ``.venv-stock``, the same wheel without the hooks;
* version 2, and the bridging build (versions 1-2): the fork's wheel rebuilt by
  ``tools/build_patched_wheel.py`` with other ``_versions.py`` lines, in venvs
  under ``build/`` made once and reused while their inputs are unchanged.

Two checks meet in such a job: torchrun's agents check each other right after
each rendezvous round, before any worker starts (:class:`TestAgentCheckCluster`
and the rolling-update scenes of :class:`TestProtocolVersionCluster`); the workers
check each other in ``init_process_group`` (what a job gets when its launcher runs
no check, and the link-down scene). Each test asserts the outcome on every host.
"No worker started" means no worker left its first report, which it writes
before it imports torch. Measured times are printed (``pytest -s`` or ``-rP``
shows them). Needs root; skips with the reason otherwise.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path
from typing import Any
from collections.abc import Mapping, Sequence

from torch.distributed._protocol_version import CHECK_MODE_ENV, PROTOCOL_VERSION
from torch.testing._internal.common_utils import (
    instantiate_parametrized_tests,
    parametrize,
    run_tests,
    TestCase,
)
from torch.testing._internal.distributed.protocol_version_builds import build_venvs
from torch.testing._internal.distributed.protocol_version_cluster import (
    Cluster,
    Command,
    ENDPOINT,
    has_check,
    Host,
    ip,
    Job,
    JOB_BOUND_S,
    PREFIX,
    read_reports,
    remove_leftovers,
    run_job,
    unavailable_reason,
)
from torch.testing._internal.distributed.protocol_version_utils import (
    MISMATCH,
    NEXT_VENV as NEXT,
    STOCK_PYTHON,
    VERSION_OVERRIDE_ENV,
)


# The fork as installed here (make test's .venv): the interpreter running this file.
FORK = Path(sys.prefix)
STOCK = STOCK_PYTHON.parents[1]
NNODES = 3
# Bounds, generous for a shared 2-core machine: one torchrun takes 5-20 s there
# (rendezvous, three interpreters importing torch at once).
VERDICT_S = 10.0  # the workers' check fails within this of the last worker's arrival
MISMATCH_EXIT_S = 30.0  # every torchrun of a refused job exits within this of the last agent's arrival
AGENT_VERDICT_S = 10.0  # a checking agent passes or refuses within this of the last agent's arrival
# The rendezvous store's timeout (c10d's read_timeout, 60 s by default) where a
# test waits for it: what a stock agent waits for beside refusing agents, and
# what checking agents wait for an invisible one.
STORE_TIMEOUT_S = 15
STORE_SLACK_S = 10.0  # leaving takes at most this past the store's timeout
LINK_TIMEOUT_S = 10.0  # link down: the workers' init timeout
NAMING_SLACK_S = 3.0  # link down: naming the missing ranks may take this past the timeout
AGENT_EXIT_S = 20.0  # link down: a torchrun exits within this once its worker has failed
LOST_HOST_BOUND_S = 40.0  # link down: how long the cut-off host's torchrun is watched
NO_CHECK = "without the protocol version check"
TAKEN_AS_1 = "taken as version 1"
AGENT_TITLE = "torch.distributed protocol version (torchrun agents)"  # how the agents' messages begin
AGENT_MISMATCH = f"{AGENT_TITLE} mismatch"
IDENTICAL_ENV = "TORCH_ELASTIC_WORKER_IDENTICAL"


def passed_line(agents: int) -> str:
    """What an agent logs when the check of ``agents`` agents passed."""
    return f"protocol version check of {agents} agents passed"


class _ClusterTestCase(TestCase):
    """A fresh cluster per test, the other builds' venvs, and what a job did."""

    fork_v2: Path
    bridge: Path

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        reason = unavailable_reason()
        if reason is not None:
            raise unittest.SkipTest(reason)
        if not (STOCK / "bin" / "python").exists():
            raise RuntimeError(f"{STOCK} is missing: `make test` creates it (stock torch, no hook)")
        cls.fork_v2, cls.bridge = build_venvs([(2, 2), (2, 1)])

    def setUp(self) -> None:
        super().setUp()
        # A fresh cluster per test: nothing of one scenario (a hung stock host, a
        # link left down) reaches the next.
        self.cluster = self.enterContext(Cluster(NNODES))
        self.hosts = self.cluster.hosts

    def launch(self, venvs: Sequence[Path], **kwargs: Any) -> Job:
        self.venvs = list(venvs)
        return run_job(self.cluster, venvs, **kwargs)

    def in_job(self, job: Job) -> list[Host]:
        return [self.hosts[i] for i in sorted(job.runs)]

    def checking(self, job: Job) -> list[Host]:
        """The hosts of the job whose build has the check."""
        return [h for h in self.in_job(job) if has_check(self.venvs[h.index])]

    def output(self, job: Job, host: Host) -> str:
        run = job.runs[host.index]
        return f"{host.name}: torchrun exited {run.returncode} (killed: {run.timed_out}):\n{run.output[-4000:]}"

    def events_of(self, job: Job, host: Host, name: str, attempt: int | None = None) -> dict[str, Any]:
        """The worker's ``name`` report on ``host``; fails with the host's output."""
        event = job.event(host, name, attempt)
        if event is None:
            self.fail(f"no {name!r} report; reports: {job.events.get(host.name)}\n{self.output(job, host)}")
        return event

    def group_rank(self, job: Job, host: Host) -> int:
        rank = job.group_rank(host)
        if rank is None:
            self.fail(f"the agent joined no rendezvous round\n{self.output(job, host)}")
        return rank

    def assert_ran(self, job: Job, negotiated: Mapping[int, int | None] | None = None, attempt: int = 0) -> None:
        """Every torchrun exited 0; every worker's attempt ``attempt`` summed
        1+...+N (rank + 1 alone in a worker that never inits); host ``i``
        negotiated ``negotiated[i]`` (when given)."""
        total = sum(range(1, len(job.runs) + 1))
        for host in self.in_job(job):
            run = job.runs[host.index]
            self.assertEqual((run.returncode, run.timed_out), (0, False), self.output(job, host))
            done = self.events_of(job, host, "done", attempt)
            self.assertEqual(done["sum"], total if done["init"] else done["rank"] + 1, host.name)
            if negotiated is not None:
                self.assertEqual(done["negotiated"], negotiated[host.index], host.name)

    def assert_agents_passed(self, job: Job, rounds: int = 1) -> dict[str, list[float]]:
        """Every checking agent passed the agent check once in each of ``rounds``
        rendezvous rounds, after joining that round and before any worker of
        that round started. Returns each host's seconds from the last agent's
        arrival to its pass, per round."""
        agents = len(job.runs)
        waited: dict[str, list[float]] = {}
        for host in self.checking(job):
            joined = job.rounds(host)
            passed = job.logged(host, passed_line(agents))
            self.assertEqual((len(joined), len(passed)), (rounds, rounds), self.output(job, host))
            ends = [r.joined for r in joined[1:]] + [float("inf")]
            waited[host.name] = []
            for attempt in range(rounds):
                self.assertLessEqual(joined[attempt].joined, passed[attempt].time, host.name)
                launches = [e["time"] for e in job.events_of(host, "launched") if joined[attempt].joined <= e["time"] < ends[attempt]]
                self.assertTrue(all(passed[attempt].time <= t for t in launches), f"{host.name}: worker before the check")
                last = max(job.rounds(h)[attempt].joined for h in self.in_job(job))
                waited[host.name].append(round(passed[attempt].time - last, 2))
        return waited

    def assert_no_worker_started(self, job: Job) -> None:
        self.assertEqual(job.launched(), [], f"workers started: {job.events}")

    def assert_agents_refused(self, job: Job, hosts: Sequence[Host], exception: str = "ProtocolVersionError") -> dict[str, str]:
        """Each of ``hosts``'s agents raised ``exception``, its message starting
        with the agents' title, and its torchrun exited non-zero by itself.
        Returns each host's message."""
        messages = {}
        for host in hosts:
            run = job.runs[host.index]
            error = job.raised(host, AGENT_TITLE)
            self.assertIsNotNone(error, self.output(job, host))
            self.assertEqual(error.type, exception, host.name)
            self.assertNotEqual(run.returncode, 0, self.output(job, host))
            self.assertFalse(run.timed_out, host.name)
            messages[host.name] = error.message
        return messages

    def refusal_times(self, job: Job, hosts: Sequence[Host]) -> str:
        """Seconds from the last agent's arrival to each agent leaving the
        rendezvous (right after it raised) and to its torchrun's exit."""
        last = job.agents_arrival()
        left = {h.name: round(job.left(h) - last, 2) if job.left(h) else None for h in hosts}
        exits = {h.name: round(job.runs[h.index].finished - last, 2) for h in hosts}
        return f"refused {left} s, torchrun exited {exits} s after the last agent's arrival"

    def assert_distribution(self, job: Job, host: Host, label: str) -> None:
        """``host`` ran the build labelled ``label`` (a real other build, not the fork)."""
        self.assertTrue(self.events_of(job, host, "start")["distribution"].endswith(label), host.name)

    def report(self, text: str) -> None:
        print(f"[{self._testMethodName}] {text}")


class TestProtocolVersionCluster(_ClusterTestCase):
    """A rolling update and the guardrail's own first rollout, with real builds:
    three agents, workers that init gloo."""

    def test_all_hosts_on_the_fork(self) -> None:
        """Every agent passes its check before its worker starts; the job runs:
        all_reduce is right and every torchrun exits 0."""
        job = self.launch([FORK] * NNODES)
        self.assert_ran(job, {h.index: PROTOCOL_VERSION for h in self.hosts})
        waited = self.assert_agents_passed(job)
        self.report(f"agents passed {waited} s after the last arrival; torchrun walls {[round(r.wall_s, 1) for r in job.runs.values()]} s")

    def test_one_host_on_a_real_version_2_build(self) -> None:
        """torchrun's agents refuse the real version-2 build before any worker
        starts: every agent raises the mismatch, naming every host, and every
        torchrun exits non-zero within 30 s of the last agent's arrival."""
        job = self.launch([FORK, FORK, self.fork_v2])
        last = job.agents_arrival()
        messages = self.assert_agents_refused(job, self.hosts)
        for host in self.hosts:
            message = messages[host.name]
            self.assertTrue(message.startswith(AGENT_MISMATCH), message)
            for named in self.hosts:
                self.assertIn(named.name, message, f"{host.name}'s message names {named.name}")
            v2 = self.hosts[2]
            self.assertIn(f"protocol version 2: rank {self.group_rank(job, v2)} on host {v2.name} (torch 2.13.0+cpu.protocolv2)", message)
            self.assertLess(job.left(host) - last, AGENT_VERDICT_S, host.name)
            self.assertLess(job.runs[host.index].finished - last, MISMATCH_EXIT_S, host.name)
        self.assert_no_worker_started(job)
        self.report(self.refusal_times(job, self.hosts))

    def test_a_host_on_torch_2_14_1(self) -> None:
        """A rolling update to the next release: node-c on the guardrail over torch
        2.14.1, beside two hosts on 2.13.0. Both releases speak version 1: every agent
        passes, the job runs, every worker records version 1."""
        if not (NEXT / "bin" / "python").exists():
            self.skipTest(f"no torch 2.14.1 environment at {NEXT}: make test-long creates it")
        job = self.launch([FORK, FORK, NEXT])
        self.assert_ran(job, {h.index: 1 for h in self.hosts})
        self.assert_distribution(job, self.hosts[2], "2.14.1")
        waited = self.assert_agents_passed(job)
        self.report(f"agents passed {waited} s after the last arrival")

    def test_a_host_on_torch_2_14_1_announcing_version_2(self) -> None:
        """The same hosts, node-c's 2.14.1 announcing version 2 (the override): every
        agent refuses before any worker starts, naming node-c and torch 2.14.1."""
        if not (NEXT / "bin" / "python").exists():
            self.skipTest(f"no torch 2.14.1 environment at {NEXT}: make test-long creates it")
        job = self.launch([FORK, FORK, NEXT], host_env={2: {VERSION_OVERRIDE_ENV: "2"}})
        messages = self.assert_agents_refused(job, self.hosts)
        next_host = self.hosts[2]
        for host in self.hosts:
            self.assertIn(f"protocol version 2: rank {self.group_rank(job, next_host)} on host {next_host.name} "
                          "(torch 2.14.1)", messages[host.name])
            self.assertRegex(messages[host.name], r"protocol version 1: ranks? \S+ on hosts? .*\(torch 2\.13\.0")
        self.assert_no_worker_started(job)
        self.report(self.refusal_times(job, self.hosts))

    def test_workers_refuse_a_real_version_2_build_without_the_agent_check(self) -> None:
        """A launcher that runs no check (here torchrun with the check off, the
        workers' on): every host's worker raises the mismatch in init_process_group,
        naming every host, and every torchrun exits non-zero within 30 s of the
        last arrival, with the default init timeout (30 minutes) in every worker."""
        job = self.launch(
            [FORK, FORK, self.fork_v2], env={CHECK_MODE_ENV: "off"}, worker_args=["--check-mode", "error"]
        )
        self.assert_distribution(job, self.hosts[2], ".protocolv2")
        failures = {host.name: self.events_of(job, host, "init_failed") for host in self.hosts}
        last = job.last_arrival()
        for host in self.hosts:
            run = job.runs[host.index]
            self.assertEqual(job.logged(host, passed_line(NNODES)), [], host.name)  # the agents did not check
            failed = failures[host.name]
            self.assertIn(MISMATCH, failed["error"], host.name)
            self.assertNotIn(AGENT_TITLE, failed["error"], host.name)
            for named in self.hosts:
                self.assertIn(named.name, failed["error"], f"{host.name}'s message names {named.name}")
            self.assertIn("protocol version 2", failed["error"])
            self.assertLess(failed["time"] - last, VERDICT_S, host.name)
            self.assertNotEqual(run.returncode, 0, host.name)
            self.assertFalse(run.timed_out, host.name)
            self.assertLess(run.finished - last, MISMATCH_EXIT_S, host.name)
        self.report(f"torchruns exited {[round(r.finished - last, 1) for r in job.runs.values()]} s after the last arrival")

    def test_bridging_build_beside_version_1(self) -> None:
        """A build of versions 1-2 among version-1 hosts: the agents pass, the job runs at 1."""
        job = self.launch([FORK, self.bridge, FORK])
        self.assert_distribution(job, self.hosts[1], ".protocolv1to2")
        self.assert_ran(job, {h.index: 1 for h in self.hosts})
        self.assert_agents_passed(job)
        self.report(f"torchrun walls {[round(r.wall_s, 1) for r in job.runs.values()]} s")

    def stock_rank(self, job: Job, stock: Host) -> int:
        start = self.events_of(job, stock, "start")
        self.assertFalse(start["has_check"], f"{STOCK} has the guardrail module")
        return start["rank"]

    @parametrize("backend", ["gloo", "traceless"])
    @parametrize("stock_host", [ENDPOINT, NNODES - 1], name_fn=lambda i: f"stock_host_{i}")
    def test_first_rollout_beside_version_1(self, stock_host: int, backend: str) -> None:
        """One host on stock torch (hosting the rendezvous or not), the others on
        the fork, default timeouts, workers on gloo or on a backend that leaves no
        trace (as NCCL): the job runs, every torchrun exits 0; every checking agent
        warns, naming the stock agent's group rank; the guardrail workers take the
        agents' verdict (negotiated version 1) and warn no more."""
        venvs = [FORK] * NNODES
        venvs[stock_host] = STOCK
        job = self.launch(venvs, worker_args=["--backend", backend])
        stock = self.hosts[stock_host]
        self.assert_ran(job, {h.index: None if h is stock else 1 for h in self.hosts})
        rank, group_rank = self.stock_rank(job, stock), self.group_rank(job, stock)
        for host in self.checking(job):
            agent = [line.text for line in job.logged(host, NO_CHECK) if AGENT_TITLE in line.text]
            self.assertTrue(any(f"rank {group_rank} " in line for line in agent), f"{agent}\n{self.output(job, host)}")
            workers = [line.text for line in job.logged(host, NO_CHECK) if AGENT_TITLE not in line.text]
            self.assertEqual(workers, [], self.output(job, host))
        waited = self.assert_agents_passed(job)
        inits = {h.name: round(self.events_of(job, h, "done")["time"] - job.last_arrival(), 2) for h in self.hosts}
        self.report(
            f"stock host {stock.name} (group rank {group_rank}, rank {rank}); agents passed {waited} s after the "
            f"last agent's arrival; init+all_reduce done after the last worker's arrival: {inits} s"
        )

    @parametrize("backend", ["gloo", "traceless"])
    @parametrize("stock_host", [ENDPOINT, NNODES - 1], name_fn=lambda i: f"stock_host_{i}")
    def test_first_rollout_beside_version_2(self, stock_host: int, backend: str) -> None:
        """One host on stock torch beside the real version-2 build (minimum 2):
        the checking agents refuse within 10 s of the last agent's arrival, naming
        the stock agent's group rank as a build without the check, taken as
        version 1; no worker starts anywhere. The stock agent cannot know: it
        waits for the others' role_info in the store and exits non-zero, at the
        store's timeout when it hosts the store (60 s by default: this test sets
        c10d's read_timeout to 15 s), or with a connection error as soon as the
        store's host exits."""
        venvs = [self.fork_v2] * NNODES
        venvs[stock_host] = STOCK
        job = self.launch(venvs, rdzv_conf={"read_timeout": STORE_TIMEOUT_S}, worker_args=["--backend", backend])
        stock = self.hosts[stock_host]
        group_rank = self.group_rank(job, stock)
        last = job.agents_arrival()
        checking = self.checking(job)
        messages = self.assert_agents_refused(job, checking)
        for host in checking:
            message = messages[host.name]
            self.assertTrue(message.startswith(AGENT_MISMATCH), message)
            named = [line for line in message.splitlines() if NO_CHECK in line and TAKEN_AS_1 in line]
            self.assertTrue(any(line.endswith(f"rank {group_rank}") for line in named), f"{host.name}:\n{message}")
            self.assertLess(job.left(host) - last, AGENT_VERDICT_S, host.name)
            self.assertLess(job.runs[host.index].finished - last, MISMATCH_EXIT_S, host.name)
        run = job.runs[stock.index]
        self.assertNotEqual(run.returncode, 0, self.output(job, stock))
        self.assertFalse(run.timed_out, stock.name)
        if stock_host == ENDPOINT:
            self.assertEqual(job.raised(stock).type, "DistStoreError", self.output(job, stock))
            self.assertIn("torchelastic/role_info", job.raised(stock).message)
        self.assertLess(run.finished - last, STORE_TIMEOUT_S + STORE_SLACK_S, stock.name)
        self.assert_no_worker_started(job)
        died_of = job.raised(stock)
        self.report(
            f"stock host {stock.name} (group rank {group_rank}) exited {run.returncode} "
            f"({died_of and died_of.type}) {run.finished - last:.1f} s after the last agent's arrival; "
            f"checking agents: {self.refusal_times(job, checking)}"
        )

    def test_link_down_during_the_check(self) -> None:
        """Host 2's link goes down while hosts 0 and 1 wait in the workers' check
        for it: they name its rank by the init timeout and their torchruns exit.
        Host 2's worker fails too, in TCPStore's connect (which retries past the
        timeout), never reaching the check; its agent has lost the rendezvous
        store with the link. Reports how long both took."""
        lost = self.hosts[2]
        with tempfile.TemporaryDirectory() as tmp:
            hold = Path(tmp) / "go"

            def cut_link(report_dir: Path) -> None:
                deadline = time.monotonic() + JOB_BOUND_S
                def started() -> int:
                    return sum(any(e["event"] == "start" for e in v) for v in read_reports(report_dir).values())

                while started() < NNODES and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(1.0)  # hosts 0 and 1 are inside the check by now
                self.cluster.set_link(lost, up=False)
                hold.touch()

            job = self.launch(
                [FORK] * NNODES,
                worker_args=["--init-timeout", str(LINK_TIMEOUT_S)],
                host_args={lost.index: ["--hold", str(hold)]},
                bounds={lost.index: LOST_HOST_BOUND_S},
                during=cut_link,
            )
        rank = self.events_of(job, lost, "start")["rank"]
        gave_up = {}
        for host in self.hosts:
            failed = self.events_of(job, host, "init_failed")
            gave_up[host.name] = round(failed["time"] - failed["began"], 2)
            if host is lost:
                continue
            self.assertLess(gave_up[host.name], LINK_TIMEOUT_S + NAMING_SLACK_S, host.name)
            self.assertIn(f"rank {rank}", failed["error"], host.name)
            run = job.runs[host.index]
            self.assertNotEqual(run.returncode, 0, host.name)
            self.assertLess(run.finished - failed["time"], AGENT_EXIT_S, self.output(job, host))
        run = job.runs[lost.index]
        outcome = "killed at the bound" if run.timed_out else f"exited {run.returncode}"
        self.report(
            f"workers gave up after {gave_up} s (timeout {LINK_TIMEOUT_S:g} s; lost rank {rank}); "
            f"torchrun walls {[round(r.wall_s, 1) for r in job.runs.values()]} s; host {lost.name}'s {outcome}"
        )


class TestAgentCheckCluster(_ClusterTestCase):
    """torchrun's agents check before any worker starts, whatever the workers do:
    two agents with workers that never call init_process_group, three with
    workers that do; restarts; TORCH_ELASTIC_WORKER_IDENTICAL."""

    def test_matching_agents_workers_without_init(self) -> None:
        """Two agents on the fork, workers that never init: both agents pass
        their check before their worker starts, and the job runs."""
        job = self.launch([FORK, FORK], worker_args=["--no-init"])
        self.assert_ran(job)
        for host in self.in_job(job):
            self.assertFalse(self.events_of(job, host, "done")["init"], host.name)
        waited = self.assert_agents_passed(job)
        self.report(f"agents passed {waited} s after the last arrival")

    def test_version_2_agent_refused_workers_without_init(self) -> None:
        """Two agents, one on the real version-2 build, workers that would never
        init (so no worker's check could catch it): both agents refuse before
        any worker starts, each naming both hosts, and both torchruns exit
        non-zero within 30 s of the last agent's arrival, without a retry
        although ``--max-restarts 3`` allows three."""
        job = self.launch([FORK, self.fork_v2], worker_args=["--no-init"], max_restarts=3)
        hosts = self.in_job(job)
        for host in hosts:
            self.assertEqual([r.round for r in job.rounds(host)], [0], host.name)
        last = job.agents_arrival()
        messages = self.assert_agents_refused(job, hosts)
        for host in hosts:
            message = messages[host.name]
            self.assertTrue(message.startswith(AGENT_MISMATCH), message)
            fork, v2 = hosts
            self.assertIn(f"protocol version 1: rank {self.group_rank(job, fork)} on host {fork.name}", message)
            self.assertIn(f"protocol version 2: rank {self.group_rank(job, v2)} on host {v2.name} (torch 2.13.0+cpu.protocolv2)", message)
            self.assertIn(f"This rank (rank {self.group_rank(job, host)}, host {host.name})", message)
            self.assertLess(job.left(host) - last, AGENT_VERDICT_S, host.name)
            self.assertLess(job.runs[host.index].finished - last, MISMATCH_EXIT_S, host.name)
        self.assert_no_worker_started(job)
        self.report(self.refusal_times(job, hosts))

    def test_stock_agent_beside_version_1_workers_without_init(self) -> None:
        """A stock agent beside a version-1 agent, workers that never init (so only
        the agents can see the stock node): the job runs, and the checking agent
        warns, naming the stock agent's group rank, within 10 s of the last
        agent's arrival (it waits its grace period of 1 s, then finds the stock
        agent's role_info)."""
        job = self.launch([FORK, STOCK], worker_args=["--no-init"])
        self.assert_ran(job)
        fork, stock = self.in_job(job)
        group_rank = self.group_rank(job, stock)
        warned = [line for line in job.logged(fork, NO_CHECK) if AGENT_TITLE in line.text]
        self.assertTrue(any(f"rank {group_rank} " in line.text for line in warned), self.output(job, fork))
        self.assertLess(warned[0].time - job.agents_arrival(), AGENT_VERDICT_S)
        self.assertLess(warned[0].time, self.events_of(job, fork, "launched")["time"])
        waited = self.assert_agents_passed(job)
        self.report(f"the checking agent warned and passed {waited} s after the last agent's arrival")

    def test_agent_restart_checks_every_round(self) -> None:
        """``--max-restarts 1``, three agents, workers that fail on attempt 0
        (before init: see the worker's ``--fail-on-attempt``) and init on
        attempt 1: the agents rendezvous again and check again (once per round,
        each time before that round's workers start), and attempt 1 completes."""
        job = self.launch([FORK] * NNODES, worker_args=["--fail-on-attempt", "0"], max_restarts=1)
        self.assert_ran(job, attempt=1)
        # A node whose worker is still starting when another node's has failed
        # restarts for that node's sake without counting a restart (torch 2.13),
        # so its worker fails once more at attempt 0: a third round, which every
        # agent joins and checks as well.
        rounds = len(job.rounds(self.hosts[0]))
        self.assertIn(rounds, (2, 3), self.output(job, self.hosts[0]))
        for host in self.hosts:
            self.assertEqual([r.round for r in job.rounds(host)], list(range(rounds)), self.output(job, host))
            self.events_of(job, host, "failed_on_purpose", attempt=0)
            self.assertEqual(job.events_of(host, "failed_on_purpose", attempt=1), [], host.name)
        waited = self.assert_agents_passed(job, rounds=rounds)
        self.report(f"agents passed {waited} s after the last agent joined each of {rounds} rounds")

    def test_worker_identical_all_checking_agents(self) -> None:
        """TORCH_ELASTIC_WORKER_IDENTICAL=1 (agents skip role_info and compute
        ranks), every agent on the fork: the check does not need role_info, so
        every agent passes within 10 s of the last arrival (not at the store's
        timeout) and the job runs."""
        job = self.launch([FORK] * NNODES, env={IDENTICAL_ENV: "1"})
        self.assert_ran(job, {h.index: PROTOCOL_VERSION for h in self.hosts})
        waited = self.assert_agents_passed(job)
        for host, seconds in waited.items():
            self.assertLess(seconds[0], AGENT_VERDICT_S, host)
        self.report(f"agents passed {waited} s after the last arrival")

    def test_worker_identical_stock_agent_warn(self) -> None:
        """TORCH_ELASTIC_WORKER_IDENTICAL=1 with a stock agent: it writes no
        role_info, so the checking agents cannot see it. With the check in
        ``warn`` they wait their grace period (1 s), then go on, naming the
        silent agent's group rank; the job runs (and the workers' own check, on
        gloo, finds the stock worker and warns as well). In ``error`` mode they
        wait for the store's timeout (60 s by default) and raise a DistStoreError
        that names TORCH_ELASTIC_WORKER_IDENTICAL, while the stock agent, which
        waits for nobody, has started its worker already: see
        test_worker_identical_stock_agent_error."""
        job = self.launch([FORK, FORK, STOCK], env={IDENTICAL_ENV: "1", CHECK_MODE_ENV: "warn"})
        self.assert_ran(job)
        stock = self.hosts[2]
        group_rank = self.group_rank(job, stock)
        last = job.agents_arrival()
        went_on = {}
        for host in self.checking(job):
            unheard = [line for line in job.logged(host, "judged without") if AGENT_TITLE in line.text]
            self.assertEqual(len(unheard), 1, self.output(job, host))
            self.assertIn(f"judged without rank {group_rank},", unheard[0].text)
            self.assertLess(unheard[0].time - last, AGENT_VERDICT_S, host.name)
            self.assertLess(unheard[0].time, self.events_of(job, host, "launched")["time"], host.name)
            went_on[host.name] = round(unheard[0].time - last, 2)
        self.report(f"stock agent (group rank {group_rank}) unheard; checking agents went on {went_on} s after the last arrival")

    def test_worker_identical_stock_agent_error(self) -> None:
        """TORCH_ELASTIC_WORKER_IDENTICAL=1 with a stock agent, the check in
        ``error`` (c10d's read_timeout set to 15 s instead of 60): the checking
        agents wait for the store's timeout, then raise a DistStoreError naming
        the silent agent's group rank and TORCH_ELASTIC_WORKER_IDENTICAL, and
        start no worker; the stock agent could not know: it started its worker
        at once (here one that never inits, and completes)."""
        job = self.launch(
            [FORK, FORK, STOCK], env={IDENTICAL_ENV: "1"}, worker_args=["--no-init"],
            rdzv_conf={"read_timeout": STORE_TIMEOUT_S},
        )
        stock = self.hosts[2]
        group_rank = self.group_rank(job, stock)
        checking = self.checking(job)
        messages = self.assert_agents_refused(job, checking, exception="DistStoreError")
        # Rank 0 times out at its own deadline, and the others read its verdict.
        first = min(job.rounds(h)[0].joined for h in checking)
        waited = {}
        for host in checking:
            message = messages[host.name]
            self.assertIn(f"rank {group_rank} never published", message, "\n".join(self.output(job, h) for h in self.hosts))
            self.assertIn(f"With {IDENTICAL_ENV}=1", message)
            waited[host.name] = round(job.left(host) - first, 2)
            self.assertGreaterEqual(waited[host.name], STORE_TIMEOUT_S, host.name)
            self.assertLess(waited[host.name], STORE_TIMEOUT_S + STORE_SLACK_S, host.name)
        self.assertEqual(job.launched(), [stock.name])
        self.events_of(job, stock, "done")
        run = job.runs[stock.index]
        self.report(
            f"checking agents raised {waited} s after the first one's arrival (store timeout {STORE_TIMEOUT_S} s); "
            f"the stock agent's worker ran; its torchrun exited {run.returncode} after {run.wall_s:.1f} s"
        )


class TestClusterFixture(TestCase):
    """The cluster itself: hosts that see only each other, and nothing left afterwards."""

    def setUp(self) -> None:
        super().setUp()
        reason = unavailable_reason()
        if reason is not None:
            self.skipTest(reason)

    def test_hosts_are_isolated_and_removed_even_on_failure(self) -> None:
        probe = (
            "import socket, subprocess; print(socket.gethostname(), socket.gethostbyname('node-b')); "
            "print(subprocess.run(['ip', '-4', 'route'], capture_output=True, text=True).stdout)"
        )
        with self.assertRaisesRegex(RuntimeError, "the test failed here"):
            with Cluster(2) as cluster:
                netns = [h.netns for h in cluster.hosts]
                pids = [int(pid) for name in netns for pid in ip("netns", "pids", name).split()]
                run = cluster.run(cluster.hosts[0], Command(FORK, ["-c", probe], timeout=60))
                raise RuntimeError("the test failed here")
        self.assertEqual(run.returncode, 0, run.output)
        names, routes = run.output.split("\n", 1)
        self.assertEqual(names, "node-a 10.213.0.2")
        # No default route: no packet can leave the bridge's subnet.
        self.assertEqual([r.split()[0] for r in routes.splitlines() if r.strip()], ["10.213.0.0/24"])
        self.assertEqual(len(pids), 2)  # one holder per host, nothing else
        left = ip("netns", "list")
        for name in netns:
            self.assertNotIn(name, left)
        for pid in pids:
            self.assertFalse(Path(f"/proc/{pid}").exists(), f"process {pid} is still there")

    def test_leftovers_of_a_dead_owner_are_removed(self) -> None:
        gone = subprocess.Popen(["true"])
        gone.wait()
        dead, alive = f"{PREFIX}-{gone.pid}-0-h0", f"{PREFIX}-{os.getpid()}-999-h0"
        for name in (dead, alive):
            ip("netns", "add", name)
        self.addCleanup(lambda: alive in ip("netns", "list") and ip("netns", "del", alive))
        stray = subprocess.Popen(["ip", "netns", "exec", dead, "sleep", "300"])
        self.addCleanup(stray.kill)
        deadline = time.monotonic() + 10
        while not ip("netns", "pids", dead).split() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertIn(dead, remove_leftovers())
        self.assertEqual(stray.wait(timeout=10), -signal.SIGKILL)
        left = ip("netns", "list")
        self.assertNotIn(dead, left)
        self.assertIn(alive, left)  # a live owner's cluster is not touched


instantiate_parametrized_tests(TestProtocolVersionCluster)


if __name__ == "__main__":
    run_tests()
