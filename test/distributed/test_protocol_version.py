# Owner(s): ["oncall: distributed"]
"""Tests for the protocol version guardrail in ``init_process_group``.

Every multi-rank test spawns real processes that run real gloo through a real
rendezvous store; the guardrail's own environment variables simulate mixed builds.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from datetime import timedelta
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
from hypothesis import given, settings, strategies as st
from torch.distributed import _protocol_version as pv
from torch.distributed._protocol_version import _exchange, _judge, _messages
from torch.distributed._protocol_version._families import C10D
from torch.distributed._protocol_version._payload import RankInfo
from torch.distributed._protocol_version._settings import check_mode, version_range
from torch.distributed._protocol_version import CHECK_MODE_ENV, VERSION_OVERRIDE_ENV
from torch.testing._internal.common_distributed import MultiProcessTestCase
from torch.testing._internal.common_utils import (
    find_free_port,
    instantiate_parametrized_tests,
    parametrize,
    run_tests,
    TestCase,
)
from torch.testing._internal.distributed.protocol_version_utils import (
    all_reduce_and_version,
    env_init,
    MISMATCH,
    rank_info,
    RankThreads,
    spawn_ranks,
    versions_env,
)


# --------------------------------------------------------------------------- #
# Functions run inside spawned ranks (module level, so spawn can pickle them)
# --------------------------------------------------------------------------- #


def _init_kwargs(path: str, rank: int, world_size: int, port: int, tmpdir: str) -> dict[str, Any]:
    """How one init path is reached; the store-based paths build the store here."""
    timeout = timedelta(seconds=60)
    common: dict[str, Any] = {"rank": rank, "world_size": world_size, "timeout": timeout}
    if path in ("tcp://", "cpu:gloo", "no-backend", "device_id"):
        common["init_method"] = f"tcp://127.0.0.1:{port}"
    elif path == "file://":
        common["init_method"] = f"file://{tmpdir}/rendezvous-{port}"
    elif path == "env://":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        common["init_method"] = "env://"
    elif path in ("TCPStore", "TCPStore-no-libuv"):
        common["store"] = dist.TCPStore(
            "127.0.0.1", port, world_size, rank == 0, timeout=timeout,
            use_libuv=path == "TCPStore",
        )
    elif path == "FileStore":
        common["store"] = dist.FileStore(f"{tmpdir}/store-{port}", world_size)
    backend = {"cpu:gloo": "cpu:gloo", "no-backend": None}.get(path, "gloo")
    if path == "device_id":
        common["device_id"] = torch.device("cpu")
    return {"backend": backend, **common}


def _outcome(fn: Any, *args: Any, **kwargs: Any) -> str:
    """Run ``fn`` and describe how it ended, so a rank can report both phases."""
    try:
        fn(*args, **kwargs)
        return "ok"
    except (RuntimeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"


def _matching_job(kwargs: dict[str, Any]) -> dict[str, Any]:
    dist.init_process_group(**kwargs)
    try:
        return all_reduce_and_version(torch, pv.get_group_protocol_version)
    finally:
        dist.destroy_process_group()


def init_path_scenario(rank: int, world_size: int, path: str, ports: tuple[int, int], tmpdir: str) -> dict[str, str]:
    """On one init path: first a mixed job (rank 1 on version 2), then a matching one."""
    os.environ[VERSION_OVERRIDE_ENV] = "2" if rank == 1 else "1"
    mixed = _outcome(dist.init_process_group, **_init_kwargs(path, rank, world_size, ports[0], tmpdir))
    os.environ.pop(VERSION_OVERRIDE_ENV)
    matching = _outcome(_matching_job, _init_kwargs(path, rank, world_size, ports[1], tmpdir))
    return {"mixed": mixed, "matching": matching}


def init_on_tcpstore(rank: int, world_size: int, port: int, timeout_s: float) -> None:
    """Init on a TCPStore that does not wait for its clients, as torchrun's does:
    a rank that never comes is then first noticed by the protocol version check."""
    store = dist.TCPStore("127.0.0.1", port, world_size, rank == 0, wait_for_workers=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))


def reinit_three_times(rank: int, world_size: int, ports: list[int]) -> list[dict[str, Any]]:
    # A port per round: rank 0's store server of one round may still be going
    # away when rank 1 starts the next, which env:// does not guard against.
    return [env_init(rank, world_size, port, timeout_s=60) for port in ports]


def init_capturing_log(rank: int, world_size: int, port: int) -> dict[str, Any]:
    """env:// init with the c10d logger captured; reports what a user would see."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    pv.logger.addHandler(handler)
    pv.logger.setLevel(logging.INFO)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        tensor = torch.ones(1)
        dist.all_reduce(tensor)
        try:
            group_version: Any = pv.get_group_protocol_version()
        except RuntimeError as e:
            group_version = str(e)
    finally:
        dist.destroy_process_group()
    return {"sum": tensor.item(), "log": records, "group_version": group_version}


class RecordingStore(dist.Store):
    """A real store behind a Python store that records every key written, counted
    or deleted through it (gloo needs only ``set``, ``get`` and ``wait``)."""

    def __init__(self, inner: dist.Store) -> None:
        super().__init__()
        self._inner = inner
        self.written: list[str] = []

    def set(self, key: str, value: Any) -> None:
        self.written.append(key)
        self._inner.set(key, value)

    def get(self, key: str) -> bytes:
        return self._inner.get(key)

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        self._inner.wait(keys, timeout) if timeout is not None else self._inner.wait(keys)

    def check(self, keys: list[str]) -> bool:
        return self._inner.check(keys)

    def add(self, key: str, value: int) -> int:
        self.written.append(key)
        return self._inner.add(key, value)

    def delete_key(self, key: str) -> bool:
        self.written.append(key)
        return self._inner.delete_key(key)


def init_on_recording_store(rank: int, world_size: int, port: int) -> list[str]:
    """Init on a store that records what is written through it; report the keys of
    the check's namespace among them (with the check off there must be none)."""
    inner = dist.TCPStore("127.0.0.1", port, world_size, rank == 0, timeout=timedelta(seconds=60))
    store = RecordingStore(inner)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        dist.barrier()  # rank 0 hosts the store: keep it up until every rank is through
    finally:
        dist.destroy_process_group()
    return [key for key in store.written if key.startswith(C10D.key_prefix + "/")]


def _check(
    store: dist.Store, rank: int, world_size: int, info: RankInfo, backend: str, timeout_s: float = 60.0, *,
    bounded: bool = False, trace: Any = None, namespace: str = "c10d/0/0",
) -> _exchange._Check:
    """One rank's check as the exchange builds it, for the functions that word its verdicts."""
    return _exchange._Check(
        store=store, family=C10D, namespace=namespace, rank=rank, world_size=world_size,
        timeout=timedelta(seconds=timeout_s), end=time.monotonic() + timeout_s, grace=1.0, bounded=bounded, patient=False, backend=backend,
        info=info, payload=info.to_payload(C10D), trace=trace,
    )


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #


class TestVersionOverride(TestCase):
    def test_default_is_the_build_constant(self) -> None:
        with mock.patch.dict(os.environ, clear=False) as env:
            env.pop(VERSION_OVERRIDE_ENV, None)
            self.assertEqual(version_range(C10D)[1], pv.PROTOCOL_VERSION)
            self.assertEqual(pv.PROTOCOL_VERSION, 1)

    @parametrize("raw,expected", [("7", 7), ("  42\n", 42), ("0", 0), (str(2**63 - 1), 2**63 - 1)])
    def test_valid_override(self, raw: str, expected: int) -> None:
        with mock.patch.dict(os.environ, {VERSION_OVERRIDE_ENV: raw}):
            self.assertEqual(version_range(C10D)[1], expected)
            self.assertEqual(version_range(C10D)[0], expected)

    @parametrize("raw", ["", " ", "abc", "1.5", "1e3", "-1", "+1", "1_0", "0x1", str(2**63), "\u0661", "１"])
    def test_invalid_override_names_variable_and_value(self, raw: str) -> None:
        with mock.patch.dict(os.environ, {VERSION_OVERRIDE_ENV: raw}):
            with self.assertRaises(RuntimeError) as ctx:
                version_range(C10D)[1]
        self.assertIn(VERSION_OVERRIDE_ENV, str(ctx.exception))
        self.assertIn(repr(raw), str(ctx.exception))

    # Anything an environment variable can hold (no NUL, no lone surrogates), plus
    # digit strings around the 64-bit limit.
    @settings(max_examples=300, deadline=None)
    @given(
        st.one_of(
            st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))),
            st.from_regex(r"\s*[0-9]{1,21}\s*", fullmatch=True),
        )
    )
    def test_override_accepts_exactly_ascii_decimal_integers(self, raw: str) -> None:
        stripped = raw.strip()
        valid = stripped.isascii() and stripped.isdigit() and int(stripped) < 2**63
        with mock.patch.dict(os.environ, {VERSION_OVERRIDE_ENV: raw}):
            if valid:
                self.assertEqual(version_range(C10D)[1], int(stripped))
            else:
                self.assertRaisesRegex(RuntimeError, VERSION_OVERRIDE_ENV, version_range, C10D)

    def test_bad_override_fails_before_any_store_traffic(self) -> None:
        store = dist.HashStore()
        with mock.patch.dict(os.environ, {VERSION_OVERRIDE_ENV: "abc"}):
            with self.assertRaisesRegex(RuntimeError, VERSION_OVERRIDE_ENV):
                pv.check_protocol_version(store, 0, 2, timedelta(seconds=1))
        self.assertEqual(store.num_keys(), 0)

    def test_check_mode_parsing(self) -> None:
        for raw, mode in [("error", "error"), (" WARN ", "warn"), ("off", "off")]:
            with mock.patch.dict(os.environ, {CHECK_MODE_ENV: raw}):
                self.assertEqual(check_mode(), mode)
        with mock.patch.dict(os.environ, {CHECK_MODE_ENV: "loud"}):
            self.assertRaisesRegex(RuntimeError, f"{CHECK_MODE_ENV}='loud'", check_mode)


class TestMessages(TestCase):
    def test_compress_ranks(self) -> None:
        self.assertEqual(_messages.compress_ranks([5, 0, 1, 2]), "0-2,5")
        self.assertEqual(_messages.compress_ranks([3]), "3")
        self.assertEqual(_messages.compress_ranks(list(range(1024))), "0-1023")
        self.assertEqual(_messages.compress_ranks([0, 2, 4, 5, 6, 9]), "0,2,4-6,9")

    def test_mismatch_message(self) -> None:
        infos = [
            rank_info(0, 1), rank_info(1, 1), rank_info(2, 1, host="node-b"), rank_info(3, 2, host="node-c"),
            rank_info(4, 1), rank_info(5, 2, host="node-c"),
        ]
        verdict = _judge.judge(C10D, infos, "gloo")
        self.assertEqual(verdict.status, "mismatch")
        self.assertExpectedInline(
            _messages.error_message(verdict.detail, infos[3], C10D),
            """\
torch.distributed protocol version mismatch: the 6 ranks of this job (backend gloo) run builds that cannot talk to each other.
  protocol version 1: ranks 0-2,4 on hosts node-a, node-b (torch 2.13.0+cpu)
  protocol version 2: ranks 3,5 on host node-c (torch 2.13.0+cpu)
Why: ranks 3,5 accept nothing older than protocol version 2, but ranks 0-2,4 speak at most version 1.
What to do: upgrade ranks 0-2,4 to a build that speaks protocol version 2, or roll ranks 3,5 back to a build that accepts protocol version 1; then restart the job.
This rank (rank 3, host node-c) runs protocol version 2.""",
        )

    def test_warn_names_the_ranks_it_judged_without(self) -> None:
        info = rank_info(0, 1)
        warn = RankInfo(**{**vars(info), "mode": "warn"})
        check = _check(dist.HashStore(), 0, 4, warn, "nccl", timeout_s=10, bounded=True)
        raws = {0: warn.to_payload(C10D).encode(), 1: rank_info(1, 1).to_payload(C10D).encode()}
        verdict = _exchange._verdict_on(check, raws, [2, 3])
        self.assertEqual((verdict.status, verdict.negotiated, verdict.without), ("ok", 1, (2, 3)))
        self.assertExpectedInline(
            verdict.detail,
            """\
torch.distributed protocol version check (backend nccl, TORCH_DISTRIBUTED_PROTOCOL_CHECK=warn): judged without ranks 2-3, not heard from within the grace period of 1s (not started, still starting, exited, or a build without the check on a backend that leaves no trace in the store); the job goes on, and a rank with the check that arrives later says so.""",
        )

    def test_timeout_message(self) -> None:
        # Rank 0's account: the ranks it never heard from. (Rank 5, seen without the
        # check through gloo's key, no longer gets a line of its own: it did arrive.)
        check = _check(dist.HashStore(), 0, 8, rank_info(0, 1), "gloo", timeout_s=120, trace=pv.gloo_key("0", "cpu"))
        payload = rank_info(1, 1).to_payload(C10D).encode()
        raws = {**dict.fromkeys([0, 1, 4, 6], payload), 5: _exchange.NO_CHECK.encode()}
        verdict = _exchange._verdict_on(check, raws, [2, 3, 7])
        self.assertEqual((verdict.status, verdict.without), ("timeout", (2, 3, 7)))
        self.assertExpectedInline(
            verdict.detail,
            """\
torch.distributed protocol version check timed out after 120s (backend gloo): ranks 2-3,7 never published a protocol version (not started, still starting, or exited).""",
        )

    def test_timeout_message_of_a_rank_waiting_for_the_verdict(self) -> None:
        # A rank other than 0 that got no verdict names, from the store, who never published.
        store = dist.HashStore()

        def account(world_size: int, published: list[int], backend: str = "gloo") -> str:
            namespace = f"test/{published}"
            store.multi_set([C10D.key(namespace, "rank", r) for r in published], ["{}"] * len(published))
            trace = pv.gloo_key("0", "cpu") if backend == "gloo" else None
            outcome = _exchange.exchange(
                store, C10D, 1, world_size, timedelta(seconds=0.2), backend, "error", namespace, trace
            )
            self.assertEqual(outcome.verdict.status, "timeout")
            return outcome.verdict.detail

        self.assertExpectedInline(
            account(8, [0, 4, 5, 6]),
            """\
torch.distributed protocol version check timed out after 0.2s (backend gloo): on rank 1: rank 0 has not delivered the verdict; ranks 2-3,7 never published a protocol version (not started, still starting, or exited).""",
        )
        # Without a backend trace, a rank without the check is silent too: the text says so.
        self.assertExpectedInline(
            account(8, [2], "nccl"),
            """\
torch.distributed protocol version check timed out after 0.2s (backend nccl): on rank 1: ranks 0,3-7 never published a protocol version (not started, still starting, exited, or a build without the check on a backend that leaves no trace in the store); rank 0 collects every rank's version.""",
        )
        self.assertExpectedInline(
            account(3, [0, 2]),
            """\
torch.distributed protocol version check timed out after 0.2s (backend gloo): on rank 1: every rank has published its version, but rank 0 has not delivered the verdict.""",
        )

    def test_long_host_lists_are_capped(self) -> None:
        infos = [rank_info(r, 1, host=f"host-{r:02d}") for r in range(20)] + [rank_info(20, 2)]
        line = _messages.describe_groups(infos)[0]
        self.assertIn("host-07 and 12 more", line)


class TestCheckOnOneStore(TestCase):
    """The exchange itself, ranks as threads on one HashStore."""

    def _run(self, store: dist.Store, versions: dict[int, int], world_size: int, timeout: float = 10.0) -> dict[int, Any]:
        """Run the ranks in ``versions`` as threads; absent ranks never arrive."""
        # The override variable is process-wide, so threads get their versions here.
        with mock.patch.object(_exchange, "local_info", lambda r, family, mode, name="": rank_info(r, versions[r])):
            outcomes = RankThreads(world_size, timeout).start(dict.fromkeys(versions, store)).join()
        return {rank: outcome.result for rank, outcome in outcomes.items()}

    def test_repeated_checks_never_reuse_a_verdict(self) -> None:
        store = dist.HashStore()
        # pass, fail, pass, fail on the very same store: each call is judged afresh.
        for versions, ok in [([1, 1, 1], True), ([1, 2, 1], False), ([1, 1, 1], True), ([2, 2, 1], False)]:
            results = self._run(store, dict(enumerate(versions)), 3)
            if ok:
                self.assertEqual(results, {0: 1, 1: 1, 2: 1})
            else:
                for result in results.values():
                    self.assertIsInstance(result, pv.ProtocolVersionError, results)
                    self.assertIn(MISMATCH, str(result))
        # Each check, passed or failed, removed its keys once every rank had read its verdict.
        self.assertEqual(store.num_keys(), 0)

    def test_missing_coordinator_is_named(self) -> None:
        results = self._run(dist.HashStore(), {1: 1, 2: 1}, 3, timeout=2.0)
        for result in results.values():
            self.assertIsInstance(result, dist.DistStoreError)
        # Each waiting rank speaks for itself, and names rank 0 alone: ranks 1-2 did publish.
        for rank, result in results.items():
            self.assertIn(
                f"timed out after 2s (backend unknown): on rank {rank}: rank 0 never published a protocol version (",
                str(result),
            )
            self.assertIn("); rank 0 collects every rank's version.", str(result))

    def test_world_size_one_needs_no_peer(self) -> None:
        store = dist.HashStore()
        started = time.monotonic()
        self.assertEqual(pv.check_protocol_version(store, 0, 1, timedelta(seconds=60)), pv.PROTOCOL_VERSION)
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual(store.num_keys(), 0)

    def test_bad_arguments(self) -> None:
        store = dist.HashStore()
        self.assertRaisesRegex(ValueError, "rank must be in", pv.check_protocol_version, store, 3, 2)
        self.assertRaisesRegex(ValueError, "world_size", pv.check_protocol_version, store, 0, 0)
        self.assertRaisesRegex(ValueError, "timeout", pv.check_protocol_version, store, 0, 2, timedelta(0))

    def test_timeout_leaves_the_store_timeout_alone(self) -> None:
        store = dist.HashStore()
        store.set_timeout(timedelta(seconds=77))
        with self.assertRaisesRegex(dist.DistStoreError, "rank 1 never published"):
            pv.check_protocol_version(store, 0, 2, timedelta(seconds=1))
        self.assertEqual(store.timeout, timedelta(seconds=77))


class TestInitProcessGroupInProcess(TestCase):
    def tearDown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        super().tearDown()

    def test_world_size_one(self) -> None:
        store = dist.HashStore()
        started = time.monotonic()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        self.assertLess(time.monotonic() - started, 5.0)
        self.assertEqual(pv.get_group_protocol_version(), pv.PROTOCOL_VERSION)

    def test_group_version_needs_a_group(self) -> None:
        self.assertRaisesRegex(RuntimeError, "init_process_group", pv.get_group_protocol_version)

    def test_fake_backend_is_skipped(self) -> None:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        with mock.patch.dict(os.environ, {VERSION_OVERRIDE_ENV: "9"}):
            dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
        self.assertRaisesRegex(RuntimeError, r"backend \(fake\) has no store", pv.get_group_protocol_version)

    def test_invalid_mode_is_an_error_before_the_backend(self) -> None:
        with mock.patch.dict(os.environ, {CHECK_MODE_ENV: "maybe"}):
            with self.assertRaisesRegex(RuntimeError, f"{CHECK_MODE_ENV}='maybe'"):
                dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        self.assertFalse(dist.is_initialized())


class TestRanksThatStartTogether(MultiProcessTestCase):
    """Upstream's harness, where the ranks start together: each test runs in every
    rank, forked, on a ``FileStore``, real gloo. Late, missing and foreign ranks
    need the repo's runners (``spawn_ranks``, ``RankThreads``): their ranks start
    apart, in other environments or interpreters."""

    @property
    def world_size(self) -> int:
        return 4

    def setUp(self) -> None:
        super().setUp()
        # Forked, as upstream's _fork_processes did: torch is imported once, in the parent.
        self._start_processes(torch.multiprocessing.get_context("fork").Process)

    def init(self, **env: str) -> None:
        os.environ.update(env)
        store = dist.FileStore(self.file_name, self.world_size)
        dist.init_process_group("gloo", store=store, rank=self.rank, world_size=self.world_size,
                                timeout=timedelta(seconds=120))
        self.addCleanup(dist.destroy_process_group)

    def test_matching_ranks_negotiate_the_build_version(self) -> None:
        self.init()
        tensor = torch.ones(1)
        dist.all_reduce(tensor)
        self.assertEqual(tensor.item(), self.world_size)
        self.assertEqual(pv.get_group_protocol_version(), pv.PROTOCOL_VERSION)

    def test_matching_overrides_negotiate_theirs(self) -> None:
        self.init(**{VERSION_OVERRIDE_ENV: "5"})
        self.assertEqual(pv.get_group_protocol_version(), 5)

    def test_one_odd_rank_fails_every_rank_fast(self) -> None:
        """With a 120 s timeout, every rank fails within seconds, naming the odd rank and its own version."""
        started = time.monotonic()
        with self.assertRaises(pv.ProtocolVersionError) as caught:
            self.init(**({VERSION_OVERRIDE_ENV: "2"} if self.rank == 2 else {}))
        self.assertLess(time.monotonic() - started, 30.0)
        message = str(caught.exception)
        self.assertIn(MISMATCH, message)
        self.assertIn("ranks 0-1,3 on host", message)
        self.assertIn("protocol version 2: rank 2 on host", message)
        self.assertIn(f"This rank (rank {self.rank}", message)
        self.assertIn(f"runs protocol version {2 if self.rank == 2 else 1}.", message)


class TestMultiProcess(TestCase):
    """Real ranks, real gloo."""

    def assert_every_rank_raised(
        self, results: list[Any], needle: str = MISMATCH, error_type: str = "ProtocolVersionError"
    ) -> None:
        for result in results:
            self.assertEqual(result.error_type, error_type, f"rank {result.rank}: {result}")
            self.assertIn(needle, result.error)

    @parametrize("path", ["env://", "tcp://", "file://", "TCPStore", "TCPStore-no-libuv", "FileStore", "cpu:gloo", "no-backend"])
    def test_init_paths(self, path: str) -> None:
        with tempfile.TemporaryDirectory() as tmpdir:
            results = spawn_ranks(init_path_scenario, 2, args=(path, (find_free_port(), find_free_port()), tmpdir))
        for result in results:
            self.assertTrue(result.ok, f"rank {result.rank}: {result}")
            self.assertIn(MISMATCH, result.value["mixed"])
            self.assertEqual(result.value["matching"], "ok")

    def test_device_id_path(self) -> None:
        # This CPU build cannot init with a device_id: stock torch rejects a cpu one
        # before it builds the backend, and the check runs only after stock's own
        # checks, so mixed and matching jobs alike get stock's ValueError, unchanged.
        with tempfile.TemporaryDirectory() as tmpdir:
            results = spawn_ranks(init_path_scenario, 2, args=("device_id", (find_free_port(), find_free_port()), tmpdir))
        stock_error = "ValueError: init_process_group device_id parameter must be an accelerator with an index"
        for result in results:
            self.assertEqual(result.value, {"mixed": stock_error, "matching": stock_error})

    def test_reinit_three_times_through_env(self) -> None:
        results = spawn_ranks(reinit_three_times, 2, args=([find_free_port() for _ in range(3)],))
        for result in results:
            self.assertEqual(result.value, [{"sum": 2.0, "group_version": 1}] * 3, str(result))

    def test_rank_that_never_arrives_is_named(self) -> None:
        # A 3-rank job whose rank 2 never starts: rank 0 names it before the timeout.
        results = spawn_ranks(init_on_tcpstore, 3, args=(find_free_port(), 6.0), ranks=[0, 1])
        # A timeout keeps stock's exception type, which elastic agents catch.
        self.assert_every_rank_raised(results, "rank 2 never published a protocol version", "DistStoreError")
        for result in results:
            self.assertIn("timed out after 6s", result.error)
            self.assertLess(result.finished - result.started, 6.0 + 5.0)

    def test_warn_mode_logs_and_goes_on(self) -> None:
        rank_env = versions_env({1: 2})
        results = spawn_ranks(init_capturing_log, 2, args=(find_free_port(),), rank_env=rank_env, common_env={CHECK_MODE_ENV: "warn"})
        for result in results:
            self.assertTrue(result.ok, str(result))
            self.assertEqual(result.value["sum"], 2.0)
            self.assertTrue(any(MISMATCH in line and "=warn: continuing" in line for line in result.value["log"]))
            self.assertIn("negotiated no protocol version", result.value["group_version"])

    def test_error_mode_logs_outcome(self) -> None:
        results = spawn_ranks(init_capturing_log, 2, args=(find_free_port(),))
        for result in results:
            self.assertTrue(any("negotiated protocol version 1" in line for line in result.value["log"]), str(result))

    def test_off_mode_touches_nothing_and_lets_a_mismatch_through(self) -> None:
        results = spawn_ranks(
            init_on_recording_store, 2, args=(find_free_port(),), rank_env=versions_env({1: 2}),
            common_env={CHECK_MODE_ENV: "off"},
        )
        self.assertEqual([(r.error, r.value) for r in results], [(None, [])] * 2)
        # The same store records the check's keys when the check runs.
        checked = spawn_ranks(init_on_recording_store, 2, args=(find_free_port(),))
        for result in checked:
            self.assertIsNone(result.error, result)
            self.assertIn(C10D.key("c10d/0/0", "rank", result.rank), result.value)


instantiate_parametrized_tests(TestVersionOverride)
instantiate_parametrized_tests(TestMultiProcess)


if __name__ == "__main__":
    run_tests()
