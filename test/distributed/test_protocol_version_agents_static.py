# Owner(s): ["oncall: distributed"]
"""The torchrun agents' check under the static rendezvous, with real ``torchrun``
processes on this host: one store for the job, the agents check its first round,
and a node whose torchrun restarts alone is judged against the job's verdict.
The slow torchrun scenes of ``test_protocol_version_agents.py``, in the long target.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from unittest import skipUnless

from torch.testing._internal.common_utils import find_free_port, run_tests
from torch.testing._internal.distributed.protocol_version_utils import (
    NO_STOCK_REASON,
    STOCK_PYTHON,
    VERSION_OVERRIDE_ENV,
)

from test_protocol_version_agents import Agent, AgentLauncher


class TestStaticRendezvous(AgentLauncher):
    """The static rendezvous: one store for the job, the agents check its first round."""

    def test_static_rendezvous_checks_once_and_a_node_restarts_alone(self) -> None:
        """The static rendezvous keeps one store namespace for the job, and a node
        whose worker failed restarts alone, as on stock: its agent, which took
        part in the check, does not wait for the others to check again, and its
        new worker inits with the other node's first one, which waited for it."""
        env = {"PV_TEST_FAIL_FIRST": "0", "PV_TEST_INIT": "1"}
        agents = self.launch([Agent(), Agent()], static=True, args=["--max-restarts=1"], env=env)
        for agent in agents:
            self.assertEqual(agent.returncode, 0, agent.output[-4000:])
            self.assertEqual(len(agent.passed), 1, agent.output[-4000:])
        self.assertEqual(self.started(), ["started.0.0", "started.0.1", "started.1.0"])
        self.assertEqual(sorted(p.name for p in self.dir.glob("sum.*")), ["sum.0.1", "sum.1.0"])
        for started in self.dir.glob("started.*"):
            started.unlink()
        refused = self.launch([Agent(), Agent(env={VERSION_OVERRIDE_ENV: "2"})], static=True)
        self.assert_refused(refused, refused)

    def test_a_static_rank_0_stopped_in_the_check_is_replaced_by_its_restart(self) -> None:
        """Node 0's worker, rank 0, publishes and waits in the check for node 1's slow
        worker, and is stopped there (exit 3). Its restart, alone, takes over the check
        its predecessor left, in the job's one namespace, and judges node 1's worker,
        which was waiting for a verdict: the job runs, as on stock."""
        env = {"PV_TEST_STOPPED_FIRST": "0", "PV_TEST_SLOW_FIRST": "1", "PV_TEST_INIT": "1"}
        agents = self.launch([Agent(), Agent()], static=True, args=["--max-restarts=1"], env=env)
        for agent in agents:
            self.assertEqual(agent.returncode, 0, agent.output[-4000:])
        self.assertEqual(self.started(), ["started.0.0", "started.0.1", "started.1.0"])
        self.assertEqual(sorted(p.name for p in self.dir.glob("sum.*")), ["sum.0.1", "sum.1.0"])

    def test_a_static_check_that_timed_out_does_not_stop_the_restarts(self) -> None:
        """Node 1's worker comes after rank 0's 3 s timeout: rank 0 fails and its node
        restarts; the restarted rank 0 takes over the check the failed one left (and node
        1's worker, should it have read that verdict, restarts too): the job runs."""
        env = {"PV_TEST_SLOW_FIRST": "1", "PV_TEST_INIT": "1", "PV_TEST_TIMEOUT": "3"}
        agents = self.launch([Agent(), Agent()], static=True, args=["--max-restarts=2"], env=env)
        for agent in agents:
            self.assertEqual(agent.returncode, 0, agent.output[-4000:])
        self.assertIn("check timed out after 3s", agents[0].output)
        self.assertEqual({p.name.split(".")[1] for p in self.dir.glob("sum.*")}, {"0", "1"})

    def test_a_static_node_that_restarts_alone_is_judged_against_the_job(self) -> None:
        """Node 1's torchrun ends (its worker fails, no restarts left) while node 0's
        worker holds the job and its store up. Node 1 comes back: on version 2 it is
        refused before its worker starts; on version 1 it rejoins alone and its worker
        inits with node 0's, on a backend without a trace: the rejoined agent gives it
        the word node 0's worker got."""
        port, static = find_free_port(), {"static": True, "nnodes": "2", "args": ["--rdzv-conf=timeout=20"]}
        release = self.dir / "release"
        with ThreadPoolExecutor(2) as pool:
            env = {"PV_TEST_HOLD": "0", "PV_TEST_INIT": "traceless"}
            node_0 = pool.submit(self.launch, [Agent()], port=port, env=env, **static)
            try:
                failed, = self.launch([Agent(node=1, env={"PV_TEST_FAIL_FIRST": "1"})], port=port, **static)
                self.assertNotEqual(failed.returncode, 0, failed.output[-4000:])
                (self.dir / "started.1.0").unlink()
                refused, = self.launch([Agent(node=1, env={VERSION_OVERRIDE_ENV: "2"})], port=port, **static)
                self.assertNotEqual(refused.returncode, 0, refused.output[-4000:])
                self.assertLess(refused.wall_s, 30.0, refused.output[-4000:])  # the store's timeout is 20 s
                self.assertIn("rank 1 restarted alone and rejoined the job that its agents had checked, and the "
                              "others negotiated protocol version 1, which this rank does not speak", refused.output)
                self.assertEqual(self.started(), ["started.0.0"])
                rejoined = pool.submit(self.launch, [Agent(node=1)], port=port, env=env, **static)
                deadline = time.monotonic() + 30
                while self.started() != ["started.0.0", "started.1.0"] and time.monotonic() < deadline:
                    time.sleep(0.1)
            finally:
                release.write_text("")
            for agent in (*node_0.result(), *rejoined.result()):
                self.assertEqual(agent.returncode, 0, agent.output[-4000:])
                self.assertNotIn("without the protocol version check", agent.output)  # an account, true or not
        self.assertEqual(self.started(), ["started.0.0", "started.1.0"])
        self.assertEqual(sorted(p.read_text() for p in self.dir.glob("version.*")), ["1", "1"])

    @skipUnless(STOCK_PYTHON.exists(), NO_STOCK_REASON)
    def test_a_static_job_with_a_stock_node_restarts_on_the_agents_verdict(self) -> None:
        """Under the static rendezvous the agents check the first round only; the workers of
        the restart, on a backend without a trace, still take the agents' verdict."""
        env = {"PV_TEST_INIT": "traceless", "PV_TEST_FAIL_FIRST": "0,1"}
        agents = self.launch([Agent(), Agent(python=STOCK_PYTHON)], static=True, args=["--max-restarts=1"], env=env)
        for agent in agents:
            self.assertEqual(agent.returncode, 0, agent.output[-4000:])
        versions = {p.name: p.read_text() for p in self.dir.glob("version.*")}
        self.assertEqual(versions, {"version.0.1": "1", "version.1.1": "stock"})


if __name__ == "__main__":
    run_tests()
