# Owner(s): ["oncall: distributed"]
"""Mutation proof: the mismatch tests pass because of the guardrail, not by luck.

The same 2-rank job with mixed protocol versions is run three times, with real
spawned ranks and real gloo: as installed (every rank must refuse), with the hook
taken out of ``distributed_c10d`` (stock torch), and with ``_check_protocol_version``
made a no-op. The two mutations are served in memory to the spawned ranks (see
protocol_version_mutation.py): the shared .venv is not touched. Each mutated rank
reports what it really compiled, so a mutation that silently failed to apply
cannot pass for a guardrail that lets mismatches through. The same is done for
the RPC hook and for torchrun's agents (their hook taken out, a version-2 agent
starts its workers), and for the watcher of ``_store`` that notices a rank without
the check (taken out, a stock agent beside a version-1 agent is never seen).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any
from collections.abc import Callable
from unittest import mock, skipUnless

from torch.distributed import distributed_c10d
from torch.distributed._protocol_version import RPC_VERSION_OVERRIDE_ENV, VERSION_OVERRIDE_ENV
from torch.testing._internal.common_utils import find_free_port, run_tests, TestCase

from protocol_version_mutation import sitecustomize_pythonpath
from test_protocol_version_agents import Agent, AGENT_MISMATCH, AgentLauncher
from protocol_version_probe import init_rank, rpc_rank
from torch.testing._internal.distributed.protocol_version_utils import (
    MISMATCH,
    NO_STOCK_REASON,
    RankResult,
    spawn_ranks,
    STOCK_PYTHON,
    versions_env,
)


# Rank 1 runs a build that speaks only version 2; rank 0 speaks only version 1.
MIXED = versions_env({1: 2})
MIXED_RPC = {1: {RPC_VERSION_OVERRIDE_ENV: "2"}}
INSTALLED_C10D = distributed_c10d.__file__


def _run_mixed_job(mutation: str | None, job: Callable[..., Any] = init_rank, mixed: Any = MIXED) -> list[RankResult]:
    """The mismatch scenario, with ``mutation`` served to every rank (None: as installed)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {}
        if mutation is not None:
            paths = [sitecustomize_pythonpath(Path(tmp), mutation), os.environ.get("PYTHONPATH")]
            env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
        # Fresh interpreters, which run the sitecustomize on PYTHONPATH before anything imports torch.
        with mock.patch.dict(os.environ, env):
            return spawn_ranks(job, 2, args=(find_free_port(),), rank_env=mixed, timeout=150, fresh=True)


class TestGuardrailMutation(TestCase):
    def assert_every_rank_refuses(self, results: list[RankResult]) -> None:
        """What the mismatch tests demand: every rank raises the mismatch error."""
        for result in results:
            self.assertEqual(result.error_type, "ProtocolVersionError", result)
            self.assertIn(MISMATCH, result.error)

    def assert_mismatch_went_through(self, results: list[RankResult], mutation: str, hook: bool) -> None:
        """Stock behaviour: init and a collective succeed on every rank, nothing negotiated."""
        for result in results:
            self.assertTrue(result.ok, result)
            self.assertEqual(result.value["sum"], 2.0)
            self.assertIsNone(result.value["group_version"])
            self.assertEqual(result.value["mutations"], [mutation])
            self.assertEqual(result.value["hook_compiled"], hook)
            # Same file on disk as the installed torch: only the code in memory differs.
            self.assertEqual(result.value["c10d_file"], INSTALLED_C10D)
        # ...so the mismatch tests' own assertion fails on this build.
        with self.assertRaises(AssertionError):
            self.assert_every_rank_refuses(results)

    def test_guardrail_installed_every_rank_refuses(self) -> None:
        self.assert_every_rank_refuses(_run_mixed_job(None))

    def test_without_hook_mismatch_initialises(self) -> None:
        self.assert_mismatch_went_through(_run_mixed_job("unhook"), "unhook", hook=False)

    def test_noop_check_lets_mismatch_through(self) -> None:
        self.assert_mismatch_went_through(_run_mixed_job("noop"), "noop", hook=True)


def _run_mixed_rpc_job(mutation: str | None) -> list[RankResult]:
    """Two RPC workers, worker 1 on RPC protocol version 2, ``mutation`` served to both."""
    return _run_mixed_job(mutation, rpc_rank, MIXED_RPC)


class TestRpcGuardrailMutation(TestCase):
    """The RPC mismatch tests pass because of the hook in init_rpc."""

    def test_guardrail_installed_every_worker_refuses(self) -> None:
        for result in _run_mixed_rpc_job(None):
            self.assertEqual(result.error_type, "ProtocolVersionError", result)
            self.assertIn("rpc protocol version mismatch", result.error)

    def test_without_hook_rpc_mismatch_goes_through(self) -> None:
        for result in _run_mixed_rpc_job("unhook_rpc"):
            self.assertTrue(result.ok, result)
            self.assertEqual(result.value, {"sum": 2.0, "hook_compiled": False, "mutations": ["unhook_rpc"]})


class TestAgentHookMutation(AgentLauncher):
    def pythonpath(self, mutation: str) -> str:
        return os.pathsep.join(filter(None, [sitecustomize_pythonpath(self.dir, mutation), os.environ.get("PYTHONPATH")]))

    def test_without_the_agent_hook_a_version_2_agent_starts_its_workers(self) -> None:
        """The agents' refusals (test_protocol_version_agents.py) come from their
        hook: taken out in memory (``unhook_agent``), two agents, one at version
        2, start their workers, as stock torchrun does."""
        agents = self.launch([Agent(), Agent(env={VERSION_OVERRIDE_ENV: "2"})], env={"PYTHONPATH": self.pythonpath("unhook_agent")})
        self.assert_ran(agents, init=False)
        for agent in agents:
            self.assertNotIn(AGENT_MISMATCH, agent.output)

    @skipUnless(STOCK_PYTHON.exists(), NO_STOCK_REASON)
    def test_without_the_watcher_a_stock_agent_is_never_seen(self) -> None:
        """A stock agent beside a version-1 agent runs with a warning
        (test_a_stock_agent_beside_version_1_runs_with_a_warning_naming_it)
        because the watcher turns the stock agent's role info into its slot.
        Without it (``blind``, in the checking agent only) the checking agent
        waits for the stock one up to the store's timeout and stops the job:
        it raises the timeout, names no build without the check, and no worker
        starts."""
        checking, stock = self.launch([Agent(env={"PYTHONPATH": self.pythonpath("blind")}), Agent(python=STOCK_PYTHON)])
        for agent in (checking, stock):
            self.assertNotEqual(agent.returncode, 0, agent.output[-4000:])
        self.assertRegex(checking.output, r"DistStoreError: torch\.distributed protocol version \(torchrun agents\) "
                         r"check timed out after \d+s(.|\n)*rank [01] never published")
        self.assertNotIn("without the protocol version check", checking.output)
        self.assertEqual(self.started(), [])


if __name__ == "__main__":
    run_tests()
