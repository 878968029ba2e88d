# Owner(s): ["oncall: distributed"]
"""The exchange's promises around mixed modes, late ranks, the store it leaves and its waits.

Each test reproduces a defect of the earlier store protocol (a token chain, marks and
half-second looks): a warn rank that entered gloo beside a raising rank, a warn job that
lost its negotiated version to a late rank, the RPC hook recording a version judged
without some workers, keys left by every check, looks that grew with a rank's lateness
and logged ``waitForInput`` on a healthy job, and a late rank that waited its whole
timeout where stock fails at once. Ranks are real processes (gloo, TCPStore) or threads
(the store exchange alone); a rank's lateness is the scenario, counted from the moment
every rank is connected.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta
from typing import Any
from unittest import mock

import torch.distributed as dist
from torch.distributed import _protocol_version as pv
from torch.distributed._protocol_version import _exchange, _judge, _rpc
from torch.distributed._protocol_version._families import C10D
from torch.testing._internal.common_utils import find_free_port, run_tests, TestCase
from torch.testing._internal.distributed.protocol_version_utils import (
    WarningCollector,
    CHECK_MODE_ENV,
    rank_info,
    RankThreads,
    spawn_ranks,
    VERSION_OVERRIDE_ENV,
)


ERROR = {CHECK_MODE_ENV: "error"}
WARN = {CHECK_MODE_ENV: "warn"}
V2 = {VERSION_OVERRIDE_ENV: "2"}


def late_gloo_init(rank: int, world_size: int, port: int, delays: dict[int, float], timeout_s: float) -> dict[str, Any]:
    """Connect (rank 0 hosts the store), wait until every rank is connected, arrive
    ``delays[rank]`` seconds later, init gloo, all_reduce, destroy. Returns the sum,
    the negotiated version (``None``: none) and what the guardrail logged."""
    import torch

    store = dist.TCPStore("127.0.0.1", port, world_size, rank == 0, timeout=timedelta(seconds=60))
    store.set(f"connected/{rank}", "1")
    store.wait([f"connected/{r}" for r in range(world_size)])
    time.sleep(delays.get(rank, 0.0))  # the arrival itself is the scenario
    collect = WarningCollector()
    logging.getLogger("torch.distributed._protocol_version").addHandler(collect)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    try:
        tensor = torch.ones(1)
        dist.all_reduce(tensor)
        try:
            version: int | None = pv.get_group_protocol_version()
        except RuntimeError:
            version = None
        return {"sum": tensor.item(), "version": version, "log": collect.messages}
    finally:
        dist.destroy_process_group()


class TestMixedModes(TestCase):
    """The strictest mode present decides for every rank, and no rank enters the
    backend beside one that raises."""

    def test_a_late_error_rank_on_version_2_refuses_a_warn_rank_0_too(self) -> None:
        results = spawn_ranks(
            late_gloo_init, 2, args=(find_free_port(), {1: 1.5}, 20.0), rank_env={0: WARN, 1: {**ERROR, **V2}}
        )
        self.assertEqual([r.error_type for r in results], ["ProtocolVersionError"] * 2, results)
        # Rank 0's own time, its interpreter's start left out: the timeout (20 s) would show.
        self.assertLess(results[0].finished - results[0].started, 12.0, "rank 0 waited in gloo for its timeout")

    def test_three_ranks_warn_error_and_a_late_error_rank_on_version_2(self) -> None:
        rank_env = {0: WARN, 1: ERROR, 2: {**ERROR, **V2}}
        results = spawn_ranks(late_gloo_init, 3, args=(find_free_port(), {2: 2.0}, 20.0), rank_env=rank_env)
        self.assertEqual([r.error_type for r in results], ["ProtocolVersionError"] * 3, results)
        for result in results:
            self.assertIn("rank 2 accepts nothing older than protocol version 2", result.error or "")


def client_gloo_init(rank: int, world_size: int, port: int, timeout_s: float) -> None:
    """Init gloo on the store the test hosts, then destroy."""
    store = dist.TCPStore("127.0.0.1", port, world_size, False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    dist.destroy_process_group()


class TestABadSettingFailsEveryRank(TestCase):
    """A rank whose guardrail setting is invalid tells the others through the check
    before it raises: they fail within seconds, naming its rank, host and variable,
    not at their timeout (60 s here)."""

    def assert_told(
        self, bad: int, setting: dict[str, str], modes: dict[int, dict[str, str]] | None = None
    ) -> tuple[dist.TCPStore, int]:
        """Returns the store, and the keys it holds beyond those it holds once a client is connected."""
        server = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=60), wait_for_workers=False)
        dist.TCPStore("127.0.0.1", server.port, 1, False, timeout=timedelta(seconds=60))
        before = server.num_keys()
        rank_env = {**(modes or {}), bad: setting}
        results = spawn_ranks(client_gloo_init, 3, args=(server.port, 60.0), rank_env=rank_env, timeout=90.0)
        for result in results:
            self.assertLess(result.finished - result.started, 20.0, result)
            if result.rank == bad:
                self.assertEqual(result.error_type, "SettingError", result)
                continue
            self.assertEqual(result.error_type, "ProtocolVersionError", result)
            self.assertIn(f"  rank {bad}: an invalid setting on host ", result.error or "")
            self.assertIn(f"{next(iter(setting))}='{next(iter(setting.values()))}' is not a valid", result.error or "")
        return server, server.num_keys() - before

    def test_rank_1_leaves_no_key(self) -> None:
        # Rank 0 judged rank 1's setting and deleted it; rank 2 read the verdict and removed the rest.
        self.assertEqual(self.assert_told(1, {CHECK_MODE_ENV: "strict"})[1], 0)

    def test_rank_0_fails_warn_ranks_too_and_the_fixed_job_runs_on_the_same_store(self) -> None:
        # A setting is an error in every mode, and so is the verdict on it. The last reader
        # removes it, so the same job with the setting fixed runs on the same store.
        server, left = self.assert_told(0, {VERSION_OVERRIDE_ENV: "two"}, {1: WARN, 2: WARN})
        self.assertEqual(left, 0)
        results = spawn_ranks(client_gloo_init, 3, args=(server.port, 60.0), timeout=90.0)
        self.assertEqual([r.error_type for r in results], [None] * 3, results)


class TestWarnKeepsTheNegotiatedVersion(TestCase):
    def test_a_warn_job_with_a_rank_two_seconds_late_negotiates_on_every_rank(self) -> None:
        results = spawn_ranks(late_gloo_init, 2, args=(find_free_port(), {1: 2.0}, 30.0), common_env=WARN)
        self.assertEqual([r.value["version"] for r in results], [1, 1], results)
        self.assertEqual([r.value["log"] for r in results], [[], []], results)


class TestWarnWithoutEvidence(TestCase):
    def test_a_late_rank_0_does_not_wait_for_a_rank_that_went_on_without_it(self) -> None:
        # No trace (a backend like NCCL): a warn rank waits its grace period for rank 0,
        # then goes on into the backend; rank 0, coming later, must not wait for it to read.
        store, went_on = dist.HashStore(), threading.Event()

        def body(store: dist.Store, rank: int, world_size: int) -> Any:
            if rank == 0:
                went_on.wait()
            outcome = _exchange.exchange(store, C10D, rank, world_size, timedelta(seconds=30), "probe", "warn", "ns")
            if rank == 1:
                went_on.set()
            return outcome.verdict

        outcomes = RankThreads(2, 30.0, body).start({0: store, 1: store}).join()
        self.assertEqual(outcomes[1].value.without, (0,), outcomes)
        self.assertEqual((outcomes[0].value.negotiated, outcomes[0].value.without), (1, ()), outcomes)
        self.assertLess(outcomes[0].finished - outcomes[1].finished, 10.0, "rank 0 waited for a reader that went on")


class TestRpcRecordsOnlyAFullVerdict(TestCase):
    def _check(self, store: dist.Store, rank: int, world_size: int) -> int | None:
        _rpc.check_rpc_protocol_version(store, f"worker{rank}", rank, world_size, None)
        return pv._rpc_negotiated["version"]

    def test_a_verdict_reached_without_a_worker_records_no_rpc_version(self) -> None:
        # A restarted attempt has no gloo trace to look at: warn waits its grace period only.
        env = {**WARN, pv.RESTART_COUNT_ENV: "1", pv.AGENT_STORE_ENV: "True"}
        with mock.patch.dict(os.environ, env), self.assertLogs("torch.distributed._protocol_version", "WARNING") as logs:
            alone = RankThreads(2, 10.0, self._check).start({0: dist.HashStore()}).join()
        self.assertIsNone(alone[0].value, alone)
        self.assertIn("judged without rank 1", "\n".join(logs.output))
        with mock.patch.dict(os.environ, env):
            store = dist.HashStore()
            both = RankThreads(2, 10.0, self._check).start({0: store, 1: store}).join()
        self.assertEqual([o.value for o in both.values()], [1, 1], both)


class TestBoundedStore(TestCase):
    def test_fifty_checks_on_one_store_leave_no_key(self) -> None:
        store = dist.HashStore()
        for _ in range(50):
            outcomes = RankThreads(3, 20.0).start(dict.fromkeys(range(3), store)).join()
            self.assertEqual([o.value for o in outcomes.values()], [1, 1, 1], outcomes)
        self.assertEqual(store.num_keys(), 0)


class _CountingStore(dist.Store):
    """A HashStore behind a Python store that counts the calls made through it."""

    def __init__(self, inner: dist.Store) -> None:
        super().__init__()
        self._inner, self.calls = inner, 0

    def __getattribute__(self, name: str) -> Any:
        if name in ("set", "get", "add", "check", "wait", "multi_get", "multi_set", "delete_key", "compare_set"):
            object.__setattr__(self, "calls", object.__getattribute__(self, "calls") + 1)
            return getattr(object.__getattribute__(self, "_inner"), name)
        return object.__getattribute__(self, name)


class TestBlockingWaits(TestCase):
    def _rank_0_calls(self, delay: float) -> int:
        """Rank 0's store calls in a 2-rank check where rank 1 arrives ``delay`` seconds after rank 0 published."""
        inner = dist.HashStore()
        counting = _CountingStore(inner)

        def body(store: dist.Store, rank: int, world_size: int) -> int:
            if rank == 1:
                inner.wait(["protocol_version/check/0/0/rank/0"])  # rank 0 is waiting
                time.sleep(delay)  # the arrival itself is the scenario
            return pv.check_protocol_version(store, rank, world_size, timedelta(seconds=30))

        outcomes = RankThreads(2, 30.0, body).start({0: counting, 1: inner}).join()
        self.assertEqual([o.value for o in outcomes.values()], [1, 1], outcomes)
        return counting.calls

    def test_rank_0_makes_as_many_calls_for_a_late_rank_as_for_a_punctual_one(self) -> None:
        # Past the grace period (1 s) the old protocol looked every half second.
        self.assertEqual(self._rank_0_calls(2.5), self._rank_0_calls(0.0))
        self.assertEqual(self._rank_0_calls(0.0), 6)  # as the docs count them

    def test_a_healthy_job_with_a_late_rank_logs_no_wait_timeout(self) -> None:
        script = textwrap.dedent("""
            import threading, time
            from datetime import timedelta
            import torch.distributed as dist
            from torch.distributed._protocol_version import check_protocol_version
            server = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=30), wait_for_workers=False)
            def rank(r):
                store = dist.TCPStore("127.0.0.1", server.port, None, False, timedelta(seconds=30))
                if r == 1:
                    store.wait(["protocol_version/check/0/0/rank/0"])
                    time.sleep(2.0)  # past the grace period: the scenario
                print(r, check_protocol_version(store, r, 2, timedelta(seconds=30)), flush=True)
            threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
            [t.start() for t in threads]
            [t.join() for t in threads]
        """)
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        self.assertEqual(sorted(proc.stdout.split("\n")[:2]), ["0 1", "1 1"], proc.stdout + proc.stderr)
        self.assertNotIn("waitForInput", proc.stderr)


class TestLateRankAfterTheOthersGaveUp(TestCase):
    def test_it_fails_at_once_naming_the_give_up(self) -> None:
        server = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=30), wait_for_workers=False)

        def client() -> dist.Store:
            return dist.TCPStore("127.0.0.1", server.port, None, False, timedelta(seconds=30))

        threads = RankThreads(3, 2.0)
        early = threads.start({0: client(), 1: client()}).join()
        self.assertTrue(all(isinstance(o.exception, dist.DistStoreError) for o in early.values()), early)
        started = time.monotonic()
        late = RankThreads(3, 20.0).start({2: client()}).join()[2]
        self.assertIsInstance(late.exception, dist.DistStoreError, late)
        self.assertLess(late.finished - started, 5.0, "the late rank waited for its timeout")
        self.assertIn("rank 2 arrived after rank 0 had reached its verdict without it: rank 0 gave up", late.error)


class TestReusedNamespace(TestCase):
    def test_an_earlier_attempts_pass_is_not_taken_by_a_rank_that_does_not_speak_it(self) -> None:
        # An earlier attempt, killed after rank 0 passed it and one rank read it, left
        # its verdict; a new rank 1 on version 2 reusing the store must not pass on it.
        base, namespace = dist.HashStore(), "check/0/0"
        verdict = dataclasses.replace(_judge.judge(C10D, [rank_info(r, 1) for r in range(3)], "unknown"), readers=2)
        old = dist.PrefixStore("job", base)
        old.multi_set([C10D.key(namespace, "rank", 0), C10D.key(namespace, "verdict")],
                      [rank_info(0, 1).to_payload(C10D), verdict.to_json()])
        old.add(C10D.key(namespace, "read"), 1)
        with mock.patch.dict(os.environ, V2), self.assertRaisesRegex(dist.DistStoreError, "already holds an earlier"):
            pv.check_protocol_version(dist.PrefixStore("job", base), 1, 3, timedelta(seconds=5))


def init_after_a_single_rank_init(rank: int, world_size: int, port: int) -> int:
    """Rank 0 first runs a group of its own (world size 1); then both ranks init together."""
    if rank == 0:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        dist.destroy_process_group()
    store = dist.TCPStore("127.0.0.1", port, world_size, rank == 0, timeout=timedelta(seconds=30))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=20))
    try:
        return pv.get_group_protocol_version()
    finally:
        dist.destroy_process_group()


def reinit_with_ranks_swapped(rank: int, world_size: int, ports: tuple[int, int]) -> list[int]:
    """Init as ``rank``, then again, on a fresh store, as ranks 0, 2, 1 of the first init are now."""
    versions = []
    for port, as_rank in zip(ports, (rank, (0, 2, 1)[rank])):
        store = dist.TCPStore("127.0.0.1", port, world_size, as_rank == 0, timeout=timedelta(seconds=30))
        dist.init_process_group("gloo", store=store, rank=as_rank, world_size=world_size, timeout=timedelta(seconds=15))
        versions.append(pv.get_group_protocol_version())
        dist.destroy_process_group()
    return versions


class TestNamespaces(TestCase):
    def test_a_single_rank_group_before_does_not_move_a_rank_to_another_namespace(self) -> None:
        results = spawn_ranks(init_after_a_single_rank_init, 2, args=(find_free_port(),))
        self.assertEqual([r.value for r in results], [1, 1], results)

    def test_ranks_swapped_on_a_re_init_derive_one_namespace(self) -> None:
        results = spawn_ranks(reinit_with_ranks_swapped, 3, args=((find_free_port(), find_free_port()),))
        for result in results:
            self.assertTrue(result.ok, result)  # the error of a rank that failed, with its type
        self.assertEqual([r.value for r in results], [[1, 1]] * 3, results)

    def test_the_restart_count_counts_only_where_workers_share_the_agents_store(self) -> None:
        with mock.patch.dict(os.environ, {pv.RESTART_COUNT_ENV: "2"}):
            os.environ.pop(pv.AGENT_STORE_ENV, None)
            self.assertEqual(pv._attempt_namespace("c10d", 1), ("c10d/0/1", False))
            os.environ[pv.AGENT_STORE_ENV] = "True"
            self.assertEqual(pv._attempt_namespace("c10d", 0), ("c10d/2/0", False))
            os.environ[pv.ROUND_ENV] = "5eed"  # the round torchrun's agents checked names the attempt
            self.assertEqual(pv._attempt_namespace("c10d", 0), ("c10d/5eed/0", False))
            os.environ.pop(pv.AGENT_STORE_ENV)
            self.assertEqual(pv._attempt_namespace("c10d", 0), ("c10d/0/0", True))
            del os.environ[pv.ROUND_ENV]


class TestPassingVerdicts(TestCase):
    def test_rank_0_does_not_wait_for_a_reader_of_a_passing_verdict(self) -> None:
        # Rank 1 published and never reads (it went on, or died): rank 0 still returns at once.
        store = dist.HashStore()
        store.set(C10D.key("ns", "rank", 1), rank_info(1, 1).to_payload(C10D))
        started = time.monotonic()
        outcome = _exchange.exchange(store, C10D, 0, 2, timedelta(seconds=30), "probe", "error", "ns")
        self.assertEqual(outcome.verdict.negotiated, 1)
        self.assertLess(time.monotonic() - started, 5.0)


class TestPublicNames(TestCase):
    def test_the_public_functions_are_plain_attributes(self) -> None:
        self.assertNotIn("__getattr__", vars(pv))
        for name in pv.__all__:
            self.assertIn(name, vars(pv))


if __name__ == "__main__":
    run_tests()
