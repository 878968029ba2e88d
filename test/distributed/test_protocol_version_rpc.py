# Owner(s): ["oncall: distributed"]
"""The RPC protocol version guardrail (INV-031) with real RPC.

Every worker is a spawned process that calls the real ``init_rpc`` with the
TensorPipe agent over a real TCP rendezvous; the RPC family's override variables
simulate other builds. The store exchange itself is the collectives' (tested in
depth there); here: the hook's place in ``init_rpc``, static and dynamic groups,
the independence of the two families, timeouts, re-init, and hostile store data.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from datetime import timedelta
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
from torch.distributed import _protocol_version as pv
from torch.distributed._protocol_version import _exchange, _rpc
from torch.distributed._protocol_version._families import C10D, RPC
from torch.testing._internal.common_utils import find_free_port, run_tests, TestCase
from torch.testing._internal.distributed.protocol_version_utils import (
    CHECK_MODE_ENV,
    env_init,
    RankResult,
    RankThreads,
    read_verdict_as,
    spawn_ranks,
    VERSION_OVERRIDE_ENV,
)


RPC_MISMATCH = "torch.distributed.rpc protocol version mismatch"
RPC_ENV = pv.RPC_VERSION_OVERRIDE_ENV
RPC_MIN_ENV = pv.RPC_MIN_VERSION_OVERRIDE_ENV


def _add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a + b


def _options(port: int, timeout_s: float) -> Any:
    from torch.distributed import rpc

    return rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}", rpc_timeout=timeout_s)


def static_worker(rank: int, world_size: int, port: int, timeout_s: float = 60.0) -> dict[str, Any]:
    """init_rpc (static group), then rpc_sync, remote and a distributed autograd
    pass against worker 0; reports the results and the negotiated RPC version."""
    from torch.distributed import autograd as dist_autograd, rpc

    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size, rpc_backend_options=_options(port, timeout_s))
    out: dict[str, Any] = {"version": pv.get_rpc_protocol_version()}
    if rank:
        out["sum"] = rpc.rpc_sync("worker0", _add, args=(torch.ones(1), torch.ones(1))).item()
        rref = rpc.remote("worker0", _add, args=(torch.ones(1), 2 * torch.ones(1)))
        out["remote"] = rref.to_here().item()
        del rref
        with dist_autograd.context() as context:
            x = torch.ones(1, requires_grad=True)
            loss = rpc.rpc_sync("worker0", _add, args=(x, x)).sum()
            dist_autograd.backward(context, [loss])
            out["grad"] = dist_autograd.get_gradients(context)[x].item()
    rpc.shutdown()
    return out


def reinit_worker(rank: int, world_size: int, port: int, rounds: int) -> list[int]:
    """init_rpc, one rpc_sync, shutdown, ``rounds`` times in one process: each
    round is judged on its own (a new ``rpc_prefix_N``)."""
    from torch.distributed import rpc

    versions = []
    for _ in range(rounds):
        rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size, rpc_backend_options=_options(port, 60.0))
        versions.append(pv.get_rpc_protocol_version())
        if rank:
            assert rpc.rpc_sync("worker0", _add, args=(torch.ones(1), torch.ones(1))).item() == 2.0
        rpc.shutdown()
    return versions


def dynamic_worker(rank: int, world_size: int, port: int, side_port: int) -> dict[str, Any]:
    """Join a dynamic group (no world_size) right after the previous rank joined or failed to, call worker 0,
    and leave once every rank has joined, after the previous one left; worker 0 leaves last. The ranks sequence
    through the test's own store: a leave that overlaps a join waits for it (RPC's membership tokens)."""
    from torch.distributed import rpc

    side = dist.TCPStore("127.0.0.1", side_port, is_master=False, timeout=timedelta(seconds=60))
    if rank:
        side.wait([f"joined/{rank - 1}"])
    try:
        rpc.init_rpc(f"worker{rank}", rank=rank, rpc_backend_options=_options(port, 30.0))
    except Exception:
        side.set(f"left/{rank}", "")
        raise
    finally:
        side.set(f"joined/{rank}", "")
    out = {"version": pv.get_rpc_protocol_version()}
    if rank:
        out["sum"] = rpc.rpc_sync("worker0", _add, args=(torch.ones(1), torch.ones(1))).item()
    side.wait([f"joined/{world_size - 1}", *([f"left/{rank - 1}"] if rank > 1 else [])])
    if rank == 0:
        side.wait([f"left/{world_size - 1}"])
    rpc.shutdown()
    side.set(f"left/{rank}", "")
    return out


class RpcTestCase(TestCase):
    def assert_every_worker_raised(self, results: list[RankResult], *fragments: str) -> None:
        for result in results:
            self.assertEqual(result.error_type, "ProtocolVersionError", f"rank {result.rank}: {result}")
            for fragment in (RPC_MISMATCH, *fragments):
                self.assertIn(fragment, result.error)


class TestStaticGroup(RpcTestCase):
    def test_matching_workers_work_as_stock(self) -> None:
        results = spawn_ranks(static_worker, 2, args=(find_free_port(),))
        self.assertTrue(all(r.ok for r in results), results)
        self.assertEqual(results[1].value, {"version": 1, "sum": 2.0, "remote": 3.0, "grad": 2.0})

    def test_one_worker_on_version_2_fails_every_worker(self) -> None:
        results = spawn_ranks(static_worker, 2, args=(find_free_port(),), rank_env={1: {RPC_ENV: "2"}})
        self.assert_every_worker_raised(results, "RPC protocol version 2: rank 1 (worker worker1)", "This is the RPC wire protocol")
        for result in results:
            self.assertLess(result.finished - result.started, 15.0)

    def test_four_workers_one_odd(self) -> None:
        results = spawn_ranks(static_worker, 4, args=(find_free_port(),), rank_env={2: {RPC_ENV: "2"}})
        self.assert_every_worker_raised(results, "RPC protocol version 1: ranks 0-1,3 (workers worker0, worker1, worker3)")

    def test_bridging_range_negotiates_down(self) -> None:
        rank_env = {0: {RPC_ENV: "2", RPC_MIN_ENV: "1"}, 1: {RPC_ENV: "1"}}
        results = spawn_ranks(static_worker, 2, args=(find_free_port(),), rank_env=rank_env)
        self.assertEqual([r.value["version"] for r in results], [1, 1], results)

    def test_collectives_override_does_not_touch_rpc(self) -> None:
        results = spawn_ranks(static_worker, 2, args=(find_free_port(),), rank_env={1: {VERSION_OVERRIDE_ENV: "2"}})
        self.assertEqual([r.value["version"] for r in results], [1, 1], results)

    def test_rpc_override_does_not_touch_collectives(self) -> None:
        results = spawn_ranks(env_init, 2, args=(find_free_port(),), rank_env={1: {RPC_ENV: "2"}})
        self.assertEqual([r.value for r in results], [{"sum": 2.0, "group_version": 1}] * 2, results)

    def test_silent_worker_is_named(self) -> None:
        # Rank 0 hosts the tcp:// store, which waits for its third client with
        # init_rpc's own 30-minute rendezvous timeout, as on stock: only rank 1
        # reaches the check, and it names the workers it never heard from: rank 2,
        # which never came, and rank 0, which collects every worker's version.
        results = spawn_ranks(static_worker, 3, args=(find_free_port(), 5.0), ranks=[0, 1], timeout=20)
        self.assertEqual(results[1].error_type, "DistStoreError", results[1])
        self.assertIn("timed out after 5s (backend tensorpipe): on rank 1: ranks 0,2 never published", results[1].error)
        self.assertIn("rank 0 collects every rank's version", results[1].error)
        self.assertIn(results[0].error_type, ("NoReport", "DistStoreError"), results[0])

    def test_reinit_after_shutdown_three_times(self) -> None:
        results = spawn_ranks(reinit_worker, 2, args=(find_free_port(), 3), timeout=180)
        self.assertEqual([r.value for r in results], [[1, 1, 1], [1, 1, 1]], results)

    def test_modes(self) -> None:
        off = spawn_ranks(static_worker, 2, args=(find_free_port(),), rank_env={1: {RPC_ENV: "2"}}, common_env={CHECK_MODE_ENV: "off"})
        for result in off:  # nothing checked, nothing negotiated: as stock
            self.assertIn("no RPC protocol version was negotiated: the check was off", str(result.error))
        warn = spawn_ranks(static_worker, 2, args=(find_free_port(),), rank_env={1: {RPC_ENV: "2"}, 0: {CHECK_MODE_ENV: "warn"}})
        self.assert_every_worker_raised(warn)  # the strictest mode present decides


class TestDynamicGroup(RpcTestCase):
    def run_group(self, **kwargs: Any) -> list[RankResult]:
        side = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        return spawn_ranks(dynamic_worker, 3, args=(find_free_port(), side.port), timeout=120, **kwargs)

    def test_compatible_workers_join(self) -> None:
        results = self.run_group()
        self.assertEqual([r.value for r in results], [{"version": 1}, {"version": 1, "sum": 2.0}, {"version": 1, "sum": 2.0}], results)

    def test_a_mismatched_joiner_fails_alone(self) -> None:
        results = self.run_group(rank_env={1: {RPC_ENV: "2"}})
        self.assertTrue(results[0].ok and results[2].ok, results)
        self.assertEqual(results[2].value, {"version": 1, "sum": 2.0})  # a later compatible joiner still joins
        self.assertEqual(results[1].error_type, "ProtocolVersionError", results[1])
        self.assertIn("worker worker1 (rank 1) cannot join the dynamic RPC group", results[1].error)
        # The group's record is its first worker's payload: its name, host and build, not its rank.
        torch_version = re.escape(importlib.metadata.version("torch"))
        self.assertRegex(results[1].error, rf"set by its first worker worker0 \(host [^,]+, torch {torch_version}\)")


class TestStoreData(TestCase):
    """What the RPC check reads from the store is parsed, never trusted."""

    def test_hostile_payload_is_named(self) -> None:
        # A pickle where rank 1 of the static group's check (namespace: the restart count) publishes.
        store = dist.HashStore()
        store.set(RPC.key("0", "rank", 1), b"\x80\x04K\x01.")
        body = lambda s, r, n: _exchange.exchange(s, RPC, r, n, timedelta(seconds=5), "tensorpipe", "error", "0")  # noqa: E731
        rank_0 = RankThreads(2, 5.0, body).start({0: store})
        read_verdict_as(store, [1], "0", RPC)  # rank 1 counts itself out, so rank 0 need not wait to its timeout
        outcome = rank_0.join()[0].value
        self.assertEqual(outcome.verdict.status, "invalid")
        self.assertIn("rank 1: not valid JSON", outcome.verdict.detail)
        self.assertTrue(outcome.verdict.detail.startswith("torch.distributed.rpc protocol version check failed"))

    def test_hostile_dynamic_record(self) -> None:
        for record in (b"garbage", json.dumps({"version": 7, "rank": 0, "founder": {"protocol_version": 1}}).encode()):
            store = dist.HashStore()
            store.set(RPC.key("dynamic", "group"), record)
            verdict, _ = _rpc._join(store, "w", 1, "error")
            self.assertEqual(verdict.status, "invalid", record)
            self.assertIn("the dynamic RPC group's record is invalid", verdict.detail)
            self.assertEqual(store.get(RPC.key("dynamic", "group")), record)  # a joiner never overwrites it

    def test_dynamic_record_is_the_founders_payload(self) -> None:
        """The first worker's compare_set leaves its own payload as the group's
        record; a joiner judges itself against the lowest version that founder accepts."""
        store = dist.HashStore()
        with mock.patch.dict(os.environ, {RPC_ENV: "3", RPC_MIN_ENV: "2"}):
            founder, info = _rpc._join(store, "w0", 0, "error")
        self.assertEqual((founder.status, founder.negotiated), ("ok", 2))
        self.assertEqual(store.get(RPC.key("dynamic", "group")).decode(), info.to_payload(RPC))
        with mock.patch.dict(os.environ, {RPC_ENV: "2"}):
            self.assertEqual(_rpc._join(store, "w1", 1, "error")[0].negotiated, 2)
        with mock.patch.dict(os.environ, {RPC_ENV: "1"}):
            refused, _ = _rpc._join(store, "w2", 2, "warn")
        self.assertEqual((refused.status, refused.enforce), ("mismatch", False))
        self.assertIn("the group runs RPC protocol version 2, set by its first worker w0 (host", refused.detail)
        self.assertEqual(store.get(RPC.key("dynamic", "group")).decode(), info.to_payload(RPC))

    def test_threads_share_the_exchange(self) -> None:
        # The RPC family runs the collectives' exchange in its own key namespace, and leaves nothing behind.
        store = dist.HashStore()

        def body(s: dist.Store, r: int, n: int) -> _exchange.Outcome:
            return _exchange.exchange(s, RPC, r, n, timedelta(seconds=20), "tensorpipe", "error", "0", name=f"w{r}")

        threads = RankThreads(3, 20.0, body).start(dict.fromkeys((0, 1), store))
        store.wait([RPC.key("0", "rank", 0), RPC.key("0", "rank", 1)], timedelta(seconds=20))
        self.assertFalse(store.check([C10D.key("0", "rank", 0)]))
        outcomes = threads.start({2: store}).join()
        self.assertEqual({o.value.verdict.negotiated for o in outcomes.values()}, {pv.RPC_PROTOCOL_VERSION})
        self.assertEqual([o.value.info.name for o in outcomes.values()], ["w0", "w1", "w2"])
        self.assertEqual(store.num_keys(), 0)

    def test_get_rpc_protocol_version_is_a_plain_attribute(self) -> None:
        self.assertIn("get_rpc_protocol_version", vars(pv))
        self.assertIn("get_rpc_protocol_version", pv.__all__)
        with self.assertRaisesRegex(RuntimeError, "needs RPC: call torch.distributed.rpc.init_rpc"):
            pv.get_rpc_protocol_version()


if __name__ == "__main__":
    run_tests()
