# Owner(s): ["oncall: distributed"]
"""The guardrail on three hosts made on one machine, with real builds on each.

Every test runs a real multi-node job: ``torchrun --nnodes 3 --nproc-per-node 1
--rdzv-backend c10d`` on each host of a fresh :class:`Cluster` (network, UTS and
mount namespaces: own hostname, own address, own /etc/hosts), the rendezvous on
host 0, one gloo worker per host (``protocol_version_cluster_worker.py``) that
inits, all_reduces and reports. What a host runs is a real build in its own venv:

* the fork: the environment running these tests (``.venv``, the hook installed);
* stock torch: ``.venv-stock``, the same wheel without the hook;
* version 2, and the bridging build (versions 1-2): the fork's wheel rebuilt by
  ``tools/build_patched_wheel.py`` with other ``_versions.py`` lines, in venvs
  under ``build/`` made once and reused while their inputs are unchanged.

Each test asserts the outcome on every host. Measured times are printed
(``pytest -s`` or ``-rP`` shows them). Needs root; skips with the reason otherwise.
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
from typing import Any, Mapping, Sequence

from torch.distributed._protocol_version import PROTOCOL_VERSION
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
from torch.testing._internal.distributed.protocol_version_utils import MISMATCH, STOCK_PYTHON


# The fork as installed here (make test's .venv): the interpreter running this file.
FORK = Path(sys.prefix)
STOCK = STOCK_PYTHON.parents[1]
NNODES = 3
# Bounds, generous for a shared 2-core machine: one torchrun takes 10-20 s there
# (rendezvous, three interpreters importing torch at once).
VERDICT_S = 10.0  # (b, d): guardrail ranks fail within this of the last arrival
MISMATCH_EXIT_S = 30.0  # (b): every host's torchrun exits within this of it
GUARDRAIL_EXIT_S = 60.0  # (d): the guardrail hosts' torchruns exit within this of it
STOCK_BOUND_S = 45.0  # (d): how long the stock host's torchrun is watched before it is killed
LINK_TIMEOUT_S = 10.0  # (e): the workers' init timeout
NAMING_SLACK_S = 3.0  # (e): naming the missing ranks may take this past the timeout
AGENT_EXIT_S = 20.0  # (e): a torchrun exits within this once its worker has failed
LOST_HOST_BOUND_S = 40.0  # (e): how long the cut-off host's torchrun is watched
NO_CHECK = "without the protocol version check"
TAKEN_AS_1 = "taken as version 1"


class TestProtocolVersionCluster(TestCase):
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
        return run_job(self.cluster, venvs, **kwargs)

    def events_of(self, job: Job, host: Host, name: str) -> dict[str, Any]:
        """The worker's ``name`` report on ``host``; fails with the host's output."""
        event = job.event(host, name)
        if event is None:
            run = job.runs[host.index]
            self.fail(
                f"{host.name}: no {name!r} report (torchrun exited {run.returncode}, "
                f"timed out: {run.timed_out}); its reports: {job.events.get(host.name)}\n"
                f"{run.output[-4000:]}"
            )
        return event

    def rank_of(self, job: Job, host: Host) -> int:
        return self.events_of(job, host, "start")["rank"]

    def assert_ran(self, job: Job, negotiated: Mapping[int, int | None]) -> None:
        """Every torchrun exited 0; every worker's all_reduce summed 1+2+3; host
        ``i`` negotiated ``negotiated[i]``."""
        for host in self.hosts:
            run = job.runs[host.index]
            self.assertEqual((run.returncode, run.timed_out), (0, False), f"{host.name}:\n{run.output[-4000:]}")
            done = self.events_of(job, host, "done")
            self.assertEqual(done["sum"], 6.0, host.name)
            self.assertEqual(done["negotiated"], negotiated[host.index], host.name)

    def assert_distribution(self, job: Job, host: Host, label: str) -> None:
        """``host`` ran the build labelled ``label`` (a real other build, not the fork)."""
        self.assertTrue(self.events_of(job, host, "start")["distribution"].endswith(label), host.name)

    def report(self, text: str) -> None:
        print(f"[{self._testMethodName}] {text}")

    # ------------------------------------------------------------------ #
    # Scenarios
    # ------------------------------------------------------------------ #

    def test_all_hosts_on_the_fork(self) -> None:
        """(a) The job runs: all_reduce is right and every torchrun exits 0."""
        job = self.launch([FORK] * NNODES)
        self.assert_ran(job, {h.index: PROTOCOL_VERSION for h in self.hosts})
        self.report(f"torchrun walls {[round(r.wall_s, 1) for r in job.runs.values()]} s")

    def test_one_host_on_a_real_version_2_build(self) -> None:
        """(b) Every host's worker raises the mismatch, naming every host, and every
        torchrun exits non-zero within 30 s of the last arrival, with the default
        init timeout (30 minutes) in every worker."""
        job = self.launch([FORK, FORK, self.fork_v2])
        self.assert_distribution(job, self.hosts[2], ".protocolv2")
        last = job.last_arrival()
        for host in self.hosts:
            run = job.runs[host.index]
            failed = self.events_of(job, host, "init_failed")
            self.assertIn(MISMATCH, failed["error"], host.name)
            for named in self.hosts:
                self.assertIn(named.name, failed["error"], f"{host.name}'s message names {named.name}")
            self.assertIn("protocol version 2", failed["error"])
            self.assertLess(failed["time"] - last, VERDICT_S, host.name)
            self.assertNotEqual(run.returncode, 0, host.name)
            self.assertFalse(run.timed_out, host.name)
            self.assertLess(run.finished - last, MISMATCH_EXIT_S, host.name)
        self.report(f"torchruns exited {[round(r.finished - last, 1) for r in job.runs.values()]} s after the last arrival")

    def test_bridging_build_beside_version_1(self) -> None:
        """(c) A build of versions 1-2 among version-1 hosts: the job runs at 1."""
        job = self.launch([FORK, self.bridge, FORK])
        self.assert_distribution(job, self.hosts[1], ".protocolv1to2")
        self.assert_ran(job, {h.index: 1 for h in self.hosts})
        self.report(f"torchrun walls {[round(r.wall_s, 1) for r in job.runs.values()]} s")

    def stock_rank(self, job: Job, stock: Host) -> int:
        start = self.events_of(job, stock, "start")
        self.assertFalse(start["has_check"], f"{STOCK} has the guardrail module")
        return start["rank"]

    @parametrize("stock_host", [ENDPOINT, NNODES - 1], name_fn=lambda i: f"stock_host_{i}")
    def test_first_rollout_beside_version_1(self, stock_host: int) -> None:
        """(d) One host on stock torch (hosting the rendezvous or not), the others on
        the fork, default init timeout: the job runs, every torchrun exits 0, and
        every guardrail host warns, naming the stock host's rank."""
        venvs = [FORK] * NNODES
        venvs[stock_host] = STOCK
        job = self.launch(venvs)
        stock = self.hosts[stock_host]
        self.assert_ran(job, {h.index: None if h is stock else 1 for h in self.hosts})
        rank = self.stock_rank(job, stock)
        for host in self.hosts:
            if host is stock:
                continue
            warnings = [line for line in job.runs[host.index].output.splitlines() if NO_CHECK in line]
            self.assertTrue(
                any(f"rank {rank} " in line for line in warnings),
                f"{host.name}: no warning naming rank {rank}: {warnings}\n{job.runs[host.index].output[-4000:]}",
            )
        inits = {h.name: round(self.events_of(job, h, "done")["time"] - job.last_arrival(), 2) for h in self.hosts}
        self.report(f"stock host {stock.name} (rank {rank}); init+all_reduce done after last arrival: {inits} s")

    @parametrize("stock_host", [ENDPOINT, NNODES - 1], name_fn=lambda i: f"stock_host_{i}")
    def test_first_rollout_beside_version_2(self, stock_host: int) -> None:
        """(d) One host on stock torch beside the real version-2 build (minimum 2),
        default init timeout: the guardrail hosts fail within 10 s of the last
        arrival, naming the stock host's rank as a build without the check, taken
        as version 1; their torchruns exit within 60 s. Reports the stock host's time."""
        venvs = [self.fork_v2] * NNODES
        venvs[stock_host] = STOCK
        job = self.launch(venvs, bounds={stock_host: STOCK_BOUND_S})
        stock = self.hosts[stock_host]
        rank = self.stock_rank(job, stock)
        last = job.last_arrival()
        for host in self.hosts:
            if host is stock:
                continue
            run = job.runs[host.index]
            failed = self.events_of(job, host, "init_failed")
            error = failed["error"]
            self.assertIn(MISMATCH, error, host.name)
            named = [line for line in error.splitlines() if NO_CHECK in line and TAKEN_AS_1 in line]
            self.assertTrue(any(f"rank {rank}" in line for line in named), f"{host.name}:\n{error}")
            self.assertLess(failed["time"] - last, VERDICT_S, host.name)
            self.assertNotEqual(run.returncode, 0, host.name)
            self.assertFalse(run.timed_out, host.name)
            self.assertLess(run.finished - last, GUARDRAIL_EXIT_S, host.name)
        run = job.runs[stock.index]
        outcome = (
            f"still running {run.finished - last:.1f} s after the last arrival, killed"
            if run.timed_out
            else f"exited {run.returncode} {run.finished - last:.1f} s after the last arrival"
        )
        verdicts = {h.name: round(self.events_of(job, h, "init_failed")["time"] - last, 2) for h in self.hosts if h is not stock}
        self.report(f"guardrail hosts failed after {verdicts} s; stock host {stock.name} (rank {rank}) {outcome}")

    def test_link_down_during_the_check(self) -> None:
        """(e) Host 2's link goes down while hosts 0 and 1 wait in the check for it:
        they name its rank by the init timeout and their torchruns exit. Host 2's
        worker fails too, in TCPStore's connect (which retries past the timeout),
        never reaching the check; its agent has lost the rendezvous store with the
        link. Reports how long both took."""
        lost = self.hosts[2]
        with tempfile.TemporaryDirectory() as tmp:
            hold = Path(tmp) / "go"

            def cut_link(report_dir: Path) -> None:
                deadline = time.monotonic() + JOB_BOUND_S
                while len(read_reports(report_dir)) < NNODES and time.monotonic() < deadline:
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
        rank = self.rank_of(job, lost)
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
            self.assertLess(run.finished - failed["time"], AGENT_EXIT_S, f"{host.name}:\n{run.output[-4000:]}")
        run = job.runs[lost.index]
        outcome = "killed at the bound" if run.timed_out else f"exited {run.returncode}"
        self.report(
            f"workers gave up after {gave_up} s (timeout {LINK_TIMEOUT_S:g} s; lost rank {rank}); "
            f"torchrun walls {[round(r.wall_s, 1) for r in job.runs.values()]} s; host {lost.name}'s {outcome}"
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
