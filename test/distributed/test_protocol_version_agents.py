# Owner(s): ["oncall: distributed"]
"""The check of torchrun's agents, with real ``torchrun`` processes on this host.

Each agent is its own ``python -m torch.distributed.run`` (one worker per agent)
joining one c10d rendezvous on a free port, the way nodes of a multi-node job
do; the namespace cluster tests run the same on separate hosts with real other
builds. Every worker first leaves a file naming its agent's group rank and its
attempt, so "no worker started" is read from the disk, not from missing output.
A build that speaks version 2 is simulated with the version override; an agent
without the check is the stock torch of ``.venv-stock``.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from datetime import timedelta
from collections.abc import Mapping, Sequence
from unittest import mock, skipUnless

import torch.distributed as dist
from torch.distributed._protocol_version import _agent
from torch.distributed._protocol_version._agent import check_agent_protocol_version
from torch.distributed._protocol_version._payload import Verdict

from torch.testing._internal.common_utils import (
    find_free_port,
    instantiate_parametrized_tests,
    parametrize,
    run_tests,
    TestCase,
)
from torch.distributed._protocol_version import (
    AGENTS_VERDICT_ENV, get_group_protocol_version, ProtocolVersionError, SettingError,
)
from torch.testing._internal.distributed.protocol_version_utils import (
    CHECK_MODE_ENV,
    GUARDRAIL_ENVS,
    NO_STOCK_REASON,
    run_in_own_session,
    STOCK_PYTHON,
    VERSION_OVERRIDE_ENV,
)


AGENT_MISMATCH = "torch.distributed protocol version (torchrun agents) mismatch"
# The sentence every agents' mismatch ends with: they refuse before any worker starts.
AGENT_NOTE = "the agents check before any of them starts its workers"
# The rendezvous store's timeout (what a stock agent waits for the others' role
# info), kept short so that a stock agent beside a refusing one ends soon.
READ_TIMEOUT_S = 10
# The bound of the issue: both agents out, non-zero, no worker started.
REFUSAL_BOUND_S = 30.0
RUN_BOUND_S = 120.0
# torchrun with the guardrail's log at INFO, so a passing agent check is seen.
AGENT = (
    "import logging, sys; from torch.distributed.run import main; "
    "logging.getLogger('torch.distributed._protocol_version').setLevel(logging.INFO); "
    "sys.argv[0] = 'torchrun'; main()"
)
PASSED = re.compile(r"Agent (\d+): protocol version check of (\d+) agents passed")

# The worker: leaves started.<group rank>.<attempt>, fails on attempt 0 on the
# group ranks listed in PV_TEST_FAIL_FIRST, takes 5 s to start on attempt 0 on
# those in PV_TEST_SLOW_FIRST, is stopped 2 s into its init on attempt 0 on those in PV_TEST_STOPPED_FIRST
# (in the check, waiting for a slow one), holds on those in PV_TEST_HOLD until the test leaves the file release,
# and with PV_TEST_INIT=1 inits gloo through torchrun's store (on attempt 0 with a timeout of PV_TEST_TIMEOUT s) and all_reduces (with
# PV_TEST_INIT=traceless, gloo under a prefix of its own, which leaves no key in the
# store before it starts, as NCCL does not), leaving the version it negotiated.
WORKER = '''\
import os, sys, time
from pathlib import Path

attempt, group_rank = os.environ["TORCHELASTIC_RESTART_COUNT"], os.environ["GROUP_RANK"]
Path(os.environ["PV_TEST_DIR"], f"started.{group_rank}.{attempt}").write_text(os.environ["RANK"])
if attempt == "0" and group_rank in os.environ.get("PV_TEST_FAIL_FIRST", "").split(","):
    sys.exit(3)
if attempt == "0" and group_rank in os.environ.get("PV_TEST_SLOW_FIRST", "").split(","):
    time.sleep(5)  # a worker late past the grace period: the arrival itself is the scenario
while group_rank in os.environ.get("PV_TEST_HOLD", "").split(",") and not Path(os.environ["PV_TEST_DIR"], "release").exists():
    time.sleep(0.1)
if os.environ.get("PV_TEST_INIT") in ("1", "traceless"):
    import torch, torch.distributed as dist
    backend = "gloo"
    if os.environ["PV_TEST_INIT"] == "traceless":
        backend = "pvtraceless"
        dist.Backend.register_backend(backend, lambda store, rank, size, timeout: dist.ProcessGroupGloo(
            dist.PrefixStore("traceless", store), rank, size, timeout), devices=["cpu"])
    if attempt == "0" and group_rank in os.environ.get("PV_TEST_STOPPED_FIRST", "").split(","):
        import threading
        threading.Timer(2.0, os._exit, (3,)).start()  # it ends wherever it is, as a stopped worker does
    import datetime
    timeout = float(os.environ.get("PV_TEST_TIMEOUT", 1800)) if attempt == "0" else 1800
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    tensor = torch.ones(1)
    dist.all_reduce(tensor)
    Path(os.environ["PV_TEST_DIR"], f"sum.{group_rank}.{attempt}").write_text(str(tensor.item()))
    try:
        from torch.distributed._protocol_version import get_group_protocol_version
        version = str(get_group_protocol_version())
    except ImportError:
        version = "stock"
    Path(os.environ["PV_TEST_DIR"], f"version.{group_rank}.{attempt}").write_text(version)
    dist.destroy_process_group()
'''


@dataclass
class Agent:
    """One node: its interpreter, its environment, and what torchrun did."""

    python: Path = Path(sys.executable)
    env: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # started this long after the others
    node: int | None = None  # its node rank under the static rendezvous, if not its place in the launch
    returncode: int | None = None
    output: str = ""
    wall_s: float = 0.0
    ended: float = 0.0  # time.monotonic() at its exit

    @property
    def passed(self) -> list[tuple[int, int]]:
        """``(group rank, agents)`` of each agent check this agent passed."""
        return [(int(m[1]), int(m[2])) for m in PASSED.finditer(self.output)]


class AgentLauncher(TestCase):
    """Launches agents in a temp dir holding the worker; the tests below, and the
    mutation proof, build on it. Has no tests of its own."""

    def setUp(self) -> None:
        super().setUp()
        tmp = tempfile.TemporaryDirectory(prefix="pv-agents-")
        self.addCleanup(tmp.cleanup)
        self.dir = Path(tmp.name)
        (self.dir / "worker.py").write_text(WORKER)

    def launch(self, agents: Sequence[Agent], nnodes: str | None = None, args: Sequence[str] = (),
               env: Mapping[str, str] | None = None, bound: float = RUN_BOUND_S, static: bool = False,
               target: Sequence[str] = (), port: int | None = None) -> list[Agent]:
        """Start every agent at once on one rendezvous (c10d, or ``static`` with
        agent ``i`` as node ``i``), and wait for all of them. The workers run
        ``target`` (torchrun's words after its options), by default the worker above."""
        port = port or find_free_port()
        base = {k: v for k, v in os.environ.items() if k not in GUARDRAIL_ENVS}
        base.update(PV_TEST_DIR=str(self.dir), **(env or {}))

        def run(i: int, agent: Agent) -> Agent:
            rdzv = (
                ["--rdzv-backend=static", "--master-addr=127.0.0.1", f"--master-port={port}",
                 f"--node-rank={i if agent.node is None else agent.node}"]
                if static else
                ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=pv", f"--rdzv-conf=read_timeout={READ_TIMEOUT_S}"]
            )
            cmd = [
                str(agent.python), "-c", AGENT, f"--nnodes={nnodes or len(agents)}", "--nproc-per-node=1",
                *rdzv, "--monitor-interval=0.1", *args, *(target or [str(self.dir / "worker.py")]),
            ]
            time.sleep(agent.delay_s)  # a node that starts late: the arrival itself is the scenario
            started = time.monotonic()
            result, timed_out = run_in_own_session(cmd, bound, {**base, **agent.env})
            self.assertFalse(timed_out, f"torchrun still running after {bound:g}s:\n{result.stdout[-4000:]}")
            agent.returncode, agent.output, agent.ended = result.returncode, result.stdout, time.monotonic()
            agent.wall_s = agent.ended - started
            return agent

        with ThreadPoolExecutor(len(agents)) as pool:
            return list(pool.map(run, range(len(agents)), agents))

    def started(self) -> list[str]:
        return sorted(p.name for p in self.dir.glob("started.*"))

    def assert_ran(self, agents: Sequence[Agent], init: bool) -> None:
        for agent in agents:
            self.assertEqual(agent.returncode, 0, agent.output[-4000:])
        self.assertEqual(self.started(), [f"started.{r}.0" for r in range(len(agents))])
        sums = sorted(p.read_text() for p in self.dir.glob("sum.*"))
        self.assertEqual(sums, [str(float(len(agents)))] * len(agents) if init else [])

    def assert_refused(self, agents: Sequence[Agent], checking: Sequence[Agent]) -> None:
        """Every agent out, non-zero, within the bound; each checking agent with
        the agents' message; no worker started anywhere."""
        for agent in agents:
            self.assertNotEqual(agent.returncode, 0, agent.output[-4000:])
            self.assertLess(agent.wall_s, REFUSAL_BOUND_S, agent.output[-4000:])
        for agent in checking:
            self.assertIn(AGENT_MISMATCH, agent.output)
            self.assertIn(AGENT_NOTE, agent.output)
        self.assertEqual(self.started(), [])


class TestAgentCheck(AgentLauncher):
    @parametrize("init", [False, True])
    def test_three_matching_agents_run(self, init: bool) -> None:
        agents = self.launch([Agent() for _ in range(3)], env={"PV_TEST_INIT": str(int(init))})
        self.assert_ran(agents, init)
        for agent in agents:
            self.assertEqual(len(agent.passed), 1, agent.output[-4000:])
            self.assertEqual(agent.passed[0][1], 3)
        self.assertEqual(sorted(a.passed[0][0] for a in agents), [0, 1, 2])

    @parametrize("init", [False, True])
    def test_an_agent_on_version_2_is_refused_before_any_worker_starts(self, init: bool) -> None:
        agents = self.launch([Agent(), Agent(env={VERSION_OVERRIDE_ENV: "2"})], env={"PV_TEST_INIT": str(int(init))})
        self.assert_refused(agents, agents)
        for agent in agents:
            self.assertRegex(agent.output, r"protocol version 1: rank \d on host")
            self.assertRegex(agent.output, r"protocol version 2: rank \d on host")

    def test_a_refusal_is_not_retried(self) -> None:
        agents = self.launch([Agent(), Agent(env={VERSION_OVERRIDE_ENV: "2"})], args=["--max-restarts=3"])
        self.assert_refused(agents, agents)
        for agent in agents:
            self.assertEqual(agent.output.count(AGENT_MISMATCH), 1, agent.output[-4000:])

    def test_an_invalid_setting_on_one_node_fails_every_node_at_once(self) -> None:
        # The node with the typo starts last, so the other one hosts the rendezvous store; before the
        # guardrail told the others, that one waited for it until the store's timeout.
        good, bad = self.launch([Agent(), Agent(env={CHECK_MODE_ENV: "strict"}, delay_s=2.0)])
        for agent in (good, bad):
            self.assertNotEqual(agent.returncode, 0, agent.output[-4000:])
        self.assertIn("SettingError", bad.output)
        self.assertRegex(good.output, rf"  rank \d: an invalid setting on host \S+: {CHECK_MODE_ENV}='strict'")
        self.assertLess(good.ended - bad.ended, 5.0, good.output[-4000:])
        self.assertEqual(self.started(), [])

    @skipUnless(STOCK_PYTHON.exists(), NO_STOCK_REASON)
    def test_a_stock_agent_beside_version_1_runs_with_a_warning_naming_it(self) -> None:
        checking, stock = self.launch([Agent(), Agent(python=STOCK_PYTHON)], env={"PV_TEST_INIT": "1"})
        self.assert_ran([checking, stock], init=True)
        (own_rank, _), = checking.passed
        stock_rank = 1 - own_rank
        self.assertIn(
            f"(torchrun agents) check (backend c10d rendezvous): rank {stock_rank} runs a build without the "
            "protocol version check", checking.output,
        )

    @skipUnless(STOCK_PYTHON.exists(), NO_STOCK_REASON)
    def test_a_stock_agent_beside_version_2_is_refused_and_starts_no_worker(self) -> None:
        """The stock agent cannot know: it ends when the refusing agent's store
        goes away, or at its store timeout when it hosts the store itself."""
        checking, stock = self.launch([Agent(env={VERSION_OVERRIDE_ENV: "2"}), Agent(python=STOCK_PYTHON)])
        self.assert_refused([checking, stock], [checking])
        self.assertRegex(checking.output, r"taken as version 1: rank \d\n")

    def test_an_agent_restart_runs_the_check_again(self) -> None:
        agents = self.launch([Agent(), Agent()], args=["--max-restarts=1"], env={"PV_TEST_FAIL_FIRST": "0,1", "PV_TEST_INIT": "1"})
        for agent in agents:
            self.assertEqual(agent.returncode, 0, agent.output[-4000:])
            self.assertEqual(len(agent.passed), 2, agent.output[-4000:])  # round 0, then round 1
        self.assertEqual(self.started(), ["started.0.0", "started.0.1", "started.1.0", "started.1.1"])
        self.assertEqual(sorted(p.name for p in self.dir.glob("sum.*")), ["sum.0.1", "sum.1.1"])

    def test_a_node_restarting_for_another_nodes_sake_inits_with_it(self) -> None:
        """Group rank 0's worker fails at once while group rank 1's is still starting:
        agent 1 restarts its worker for agent 0's sake and keeps its restart count (0)
        where agent 0's is now 1, so the restart count does not name the attempt. The
        workers init on the round their agents checked, as stock's do."""
        env = {"PV_TEST_FAIL_FIRST": "0", "PV_TEST_SLOW_FIRST": "1", "PV_TEST_INIT": "1"}
        agents = self.launch([Agent(), Agent()], args=["--max-restarts=1"], env=env)
        for agent in agents:
            self.assertEqual(agent.returncode, 0, agent.output[-4000:])
        sums = [p.read_text() for p in self.dir.glob("sum.*")]
        self.assertEqual(sums, ["2.0", "2.0"], self.started())

    def test_elastic_membership_keeps_working(self) -> None:
        agents = self.launch([Agent(), Agent()], nnodes="1:3", args=["--rdzv-conf=last_call_timeout=2"], env={"PV_TEST_INIT": "1"})
        for agent in agents:
            self.assertEqual(agent.returncode, 0, agent.output[-4000:])
            self.assertIn(2, [n for _, n in agent.passed], agent.output[-4000:])  # a round of both agents was checked
        self.assertTrue(self.started(), "no worker started")

    def test_worker_identical_with_every_agent_checking(self) -> None:
        agents = self.launch([Agent(), Agent()], env={"TORCH_ELASTIC_WORKER_IDENTICAL": "1", "PV_TEST_INIT": "1"})
        self.assert_ran(agents, init=True)
        self.assertEqual(sorted(a.passed[0][0] for a in agents), [0, 1])

    @skipUnless(STOCK_PYTHON.exists(), NO_STOCK_REASON)
    def test_worker_identical_hides_a_stock_agent_which_warn_names(self) -> None:
        """With ``TORCH_ELASTIC_WORKER_IDENTICAL=1`` a stock agent writes no role
        info: nothing shows it. In ``warn`` the checking agent goes on after its
        grace period and names it; in ``error`` it waits for the store's timeout
        and stops, naming the variable (:class:`TestWorkerIdenticalMessage`)."""
        checking, stock = self.launch(
            [Agent(env={CHECK_MODE_ENV: "warn"}), Agent(python=STOCK_PYTHON)],
            env={"TORCH_ELASTIC_WORKER_IDENTICAL": "1"},
        )
        self.assert_ran([checking, stock], init=False)
        # Either agent may be rank 0: as rank 0 it judges without the stock agent; as
        # another rank it waits its grace period for rank 0, then judges alone.
        self.assertRegex(checking.output, r"\(torchrun agents\) check \(backend c10d rendezvous, "
                         r"TORCH_DISTRIBUTED_PROTOCOL_CHECK=warn\): judged without rank \d, not heard from")


class TestTheAgentsWord(AgentLauncher):
    """What torchrun's agents tell the workers they start (and the preflight, which they leave the
    check to); a class of its own, so that pytest-xdist runs it beside the others."""

    @skipUnless(STOCK_PYTHON.exists(), NO_STOCK_REASON)
    def test_a_stock_node_beside_version_1_runs_on_a_backend_without_a_trace(self) -> None:
        """The agents saw the stock node; its workers publish nothing, and the plugin backend
        leaves no key before it starts. The checking node's workers take the agents' verdict
        and record its version, rather than wait for the stock worker until their timeout."""
        for stock_first in (False, True):
            with self.subTest(stock_first=stock_first):
                for leftover in [*self.dir.glob("started.*"), *self.dir.glob("sum.*"), *self.dir.glob("version.*")]:
                    leftover.unlink()
                checking = Agent(delay_s=1.0 if stock_first else 0.0)
                stock = Agent(python=STOCK_PYTHON, delay_s=0.0 if stock_first else 1.0)
                self.launch([checking, stock], env={"PV_TEST_INIT": "traceless"})
                self.assert_ran([checking, stock], init=True)
                for agent in (checking, stock):  # the workers' timeout is gloo's default, 30 min
                    self.assertLess(agent.wall_s, 25.0, agent.output[-4000:])
                self.assertIn("runs a build without the protocol version check", checking.output)
                versions = sorted(p.read_text() for p in self.dir.glob("version.*"))
                self.assertEqual(versions, ["1", "stock"])

    def test_warn_workers_wait_for_a_late_worker_where_every_agent_checked(self) -> None:
        """On a backend without a trace, warn waits only its grace period for ranks nothing
        shows; under torchrun the agents' word that every node checks is that evidence, so
        a worker 5 s late is waited for and both record the negotiated version."""
        env = {"PV_TEST_INIT": "traceless", "PV_TEST_SLOW_FIRST": "1", CHECK_MODE_ENV: "warn"}
        agents = self.launch([Agent(), Agent()], env=env)
        self.assert_ran(agents, init=True)
        self.assertEqual(sorted(p.read_text() for p in self.dir.glob("version.*")), ["1", "1"])

    def test_only_the_preflight_as_entry_point_is_left_to_the_workers(self) -> None:
        module = "torch.distributed._protocol_version"
        for args, preflight in (
            (("-u", "-m", module, "--preflight"), True),  # torchrun -m <module> --preflight
            (("-m", module, "--timeout", "9", "--preflight"), True),  # --no-python python -m ...
            (("-u", "-m", module), False),  # the node CLI, no roll call
            (("-u", "worker.py", "-m", module, "--preflight"), False),  # a script taking such arguments
            (("-u", "-m", "other", "-m", module, "--preflight"), False),
        ):
            with self.subTest(args=args):
                self.assertEqual(_agent._runs_the_preflight(args), preflight)

    def test_the_preflight_runs_on_a_mismatched_cluster(self) -> None:
        """The agents leave the check to the preflight, which is the check: it prints what every
        node runs, and every worker exits 1, as init_process_group would refuse the job."""
        agents = self.launch([Agent(), Agent(env={VERSION_OVERRIDE_ENV: "2"})],
                             target=["-m", "torch.distributed._protocol_version", "--preflight", "--timeout", "60"])
        for agent in agents:
            self.assertEqual(agent.returncode, 1, agent.output[-4000:])  # the preflight's own code
            self.assertNotIn(AGENT_MISMATCH, agent.output)
        table = next(a.output for a in agents if "protocol" in a.output and "host" in a.output)
        self.assertRegex(table, r"torch.distributed protocol version mismatch")
        self.assertRegex(table, r"protocol version 1: rank \d on host")
        self.assertRegex(table, r"protocol version 2: rank \d on host")


class TestTheAgentsVerdictInAWorker(TestCase):
    """A worker of torchrun's (``RANK`` and ``WORLD_SIZE`` as torchrun sets them) whose agents saw a
    node without the check: a group of one rank here, on a ``HashStore``."""

    def init(self, word: str, **env: str) -> int:
        torchrun = {"RANK": "0", "WORLD_SIZE": "1", AGENTS_VERDICT_ENV: word}
        with mock.patch.dict(os.environ, {**torchrun, **env}):
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        self.addCleanup(dist.destroy_process_group)
        return get_group_protocol_version()

    def test_a_worker_records_the_version_the_agents_negotiated(self) -> None:
        self.assertEqual(self.init("1"), 1)

    def test_a_worker_that_does_not_speak_it_is_refused(self) -> None:
        """A worker on another build than its agent's (here: the override)."""
        with self.assertRaisesRegex(ProtocolVersionError, "rank 0 took the verdict of torchrun's agents, and the "
                                    "others negotiated protocol version 1, which this rank does not speak"):
            self.init("1", **{VERSION_OVERRIDE_ENV: "2"})

    def test_none_records_no_version(self) -> None:
        with self.assertRaisesRegex(RuntimeError, "negotiated no protocol version"):
            self.init("none")

    def test_a_value_torchrun_never_sets_is_refused(self) -> None:
        for word in ("abc", "-1", "", "\u00b2", "99999999999999999999"):
            with self.subTest(word=word), self.assertRaisesRegex(SettingError, AGENTS_VERDICT_ENV):
                self.init(word)

    def test_a_process_a_worker_starts_runs_its_own_check(self) -> None:
        """It inherits the variable, but not the worker's rank and world size."""
        self.assertEqual(self.init("1", RANK="3", WORLD_SIZE="8", **{VERSION_OVERRIDE_ENV: "2"}), 2)


class TestAStaticNodeThatRejoins(TestCase):
    """The static rendezvous' record of the job, on a ``HashStore``: the strictest mode present decides."""

    def rejoin(self, job: Verdict, **env: str) -> str | None:
        store = dist.HashStore()
        store.set(_agent.STATIC_VERDICT, job.to_json())
        with mock.patch.object(_agent, "_rounds", itertools.count()), mock.patch.dict(os.environ, env):
            check_agent_protocol_version(store, 1, 2, "static")
            return os.environ.get(AGENTS_VERDICT_ENV)

    def test_a_warn_node_on_another_version_is_refused_where_the_job_runs_error(self) -> None:
        with self.assertRaisesRegex(ProtocolVersionError, "rank 1 restarted alone and rejoined the job"):
            self.rejoin(Verdict("ok", "", 1, enforce=True), **{CHECK_MODE_ENV: "warn", VERSION_OVERRIDE_ENV: "2"})

    def test_a_warn_node_on_another_version_goes_on_where_every_rank_ran_warn(self) -> None:
        job = Verdict("ok", "", 1, enforce=False)
        self.assertEqual(self.rejoin(job, **{CHECK_MODE_ENV: "warn", VERSION_OVERRIDE_ENV: "2"}), "none")

    def test_a_node_that_speaks_the_version_hands_it_to_its_workers(self) -> None:
        self.assertEqual(self.rejoin(Verdict("ok", "", 1)), "1")

    def test_a_record_that_is_not_a_verdict_is_refused(self) -> None:
        store = dist.HashStore()
        store.set(_agent.STATIC_VERDICT, "[1, 2]")
        with mock.patch.object(_agent, "_rounds", itertools.count()):
            with self.assertRaisesRegex(ProtocolVersionError, "holds an unreadable verdict"):
                check_agent_protocol_version(store, 1, 2, "static")


class TestWorkerIdenticalMessage(TestCase):
    def test_an_agent_that_hears_nothing_names_the_variable(self) -> None:
        """Agent 1 never takes part and, with the variable set, leaves no role
        info: agent 0 stops at the store's timeout, saying what to change."""
        store = dist.HashStore()
        store.set_timeout(timedelta(seconds=2))
        with mock.patch.dict(os.environ, {"TORCH_ELASTIC_WORKER_IDENTICAL": "1"}):
            with self.assertRaisesRegex(dist.DistStoreError, "rank 1 never published(.|\\n)*With TORCH_ELASTIC_WORKER_IDENTICAL=1 an agent"):
                check_agent_protocol_version(store, 0, 2, "c10d")


instantiate_parametrized_tests(TestAgentCheck)


if __name__ == "__main__":
    run_tests()
