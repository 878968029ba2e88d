# Owner(s): ["oncall: distributed"]
"""Off the happy path, never worse than stock torch.

The same job runs on the fork (``.venv``) and on stock torch (``.venv-stock``, the
same wheel without the hook): whatever stock runs, the fork runs; whatever stock
refuses at once, the fork refuses at once. Then the paths stock has no opinion
on, because it has no check: late and missing ranks named correctly on every
rank, ranks in different modes, a shared store's timeout, the types of errors.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import torch.distributed as dist
from hypothesis import given, HealthCheck, settings, strategies as st
from torch.distributed import _protocol_version as pv
from torch.distributed._protocol_version._settings import version_range
from torch.distributed._protocol_version import _exchange, _judge, _messages
from torch.distributed._protocol_version._families import C10D
from torch.testing._internal.common_utils import find_free_port, run_tests, TestCase
from torch.testing._internal.distributed import protocol_version_job
from torch.testing._internal.distributed.protocol_version_utils import (
    CHECK_MODE_ENV,
    GUARDRAIL_ENVS,
    MISMATCH,
    NO_STOCK_REASON,
    rank_info,
    RankThreads,
    register_traceless_backend,
    run_in_own_session,
    spawn_ranks,
    STOCK_PYTHON,
    ThreadOutcome,
    TRACELESS_BACKEND,
    VERSION_OVERRIDE_ENV,
)


# The job imports only torch, so stock torch can run the file as a script.
JOB = Path(protocol_version_job.__file__).resolve()
PATCHED_PY = Path(sys.executable)
# Said of a rank that is present and waiting: never that it may have died.
DIED = re.compile(r"died|may not have started")


def run_jobs(python: Path, jobs: list[dict[str, Any]]) -> tuple[list[list[dict[str, Any]]], str]:
    """Run ``protocol_version_job.py`` with ``python`` on ``jobs``, one after the
    other in one interpreter; each job's rank outcomes, and the log output of them
    all (a test that reads the log runs one job)."""
    env = {k: v for k, v in os.environ.items() if k not in GUARDRAIL_ENVS}
    wall = sum(float(job.get("wall", 120)) for job in jobs)
    proc, timed_out = run_in_own_session([str(python), str(JOB), json.dumps(jobs)], timeout=wall + 60, env=env)
    assert not timed_out, proc.stdout[-3000:]
    lines = proc.stdout.strip().splitlines()
    outcomes = [json.loads(line.removeprefix("outcomes: ")) for line in lines if line.startswith("outcomes: ")]
    assert len(outcomes) == len(jobs), proc.stdout[-3000:]
    return outcomes, "\n".join(line for line in lines if not line.startswith("outcomes: "))


def run_job(python: Path, job: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """:func:`run_jobs` on one job."""
    outcomes, log = run_jobs(python, [job])
    return outcomes[0], log


class TestStockParity(TestCase):
    """A job stock torch runs, the fork runs; one stock refuses at once, the fork
    refuses at once, with stock's own error."""

    def setUp(self) -> None:
        super().setUp()
        if not STOCK_PYTHON.exists():
            self.skipTest(NO_STOCK_REASON)

    def both(self, job: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return run_job(PATCHED_PY, job)[0], run_job(STOCK_PYTHON, job)[0]

    def test_rank_arriving_at_94_percent_of_the_timeout(self) -> None:
        # The others wait from their own arrival; rank 2 comes 9.4 s into a 10 s timeout.
        job = {"world_size": 3, "init": "tcpstore", "timeout": 10, "delays": {"2": 9.4}}
        patched, stock = self.both(job)
        self.assertEqual([o["ok"] for o in stock], [True] * 3, stock)
        self.assertEqual(patched, [dict(o, seconds=p["seconds"]) for o, p in zip(stock, patched)])

    def test_rank_arriving_at_98_percent_of_the_timeout(self) -> None:
        # Rank 2 publishes just before the others' deadlines: rank 0's one blocking
        # wait returns, and a rank whose deadline passes while the verdict on a
        # complete job is in flight still reads it: the job runs, as on stock.
        job = {"world_size": 3, "init": "tcpstore", "timeout": 10, "delays": {"2": 9.8}}
        patched, _ = run_job(PATCHED_PY, job)
        self.assertEqual([o.get("sum") for o in patched], [3.0] * 3, patched)

    def test_rank_0_late_on_env(self) -> None:
        job = {"world_size": 3, "init": "env", "timeout": 10, "delays": {"0": 3}}
        patched, stock = self.both(job)
        self.assertEqual([o.get("sum") for o in patched], [3.0] * 3, patched)
        self.assertEqual([o.get("sum") for o in stock], [3.0] * 3, stock)

    # Every argument stock's init_process_group and _new_process_group_helper refuse
    # on this CPU build, with the peers absent (only rank 1 of 2 starts): the fork
    # raises stock's own error type at once, because the check runs only after
    # stock's checks, right before a backend is constructed.
    ARGUMENT_ERRORS = {
        "device_id cpu": {"kwargs": {"device_id": "cpu"}},
        "device_id int without an accelerator": {"kwargs": {"device_id": 0}},
        "device_id of a foreign type": {"kwargs": {"device_id": "cuda:0"}},
        "timeout not a timedelta": {"kwargs": {"timeout": 5}},
        "nccl on a CPU build": {"backend": "nccl"},
        "nccl-legacy without GPUs": {"backend": "nccl-legacy"},  # 2.13: no such backend; 2.14: ProcessGroupNCCL
        "xccl on a CPU build": {"backend": "xccl"},
        "ucc not built": {"backend": "ucc"},
        "unknown backend": {"backend": "bogus"},
        "mpi with a rank and world size": {"backend": "mpi"},
        "negative rank": {"rank_arg": {"1": -1}},
        "rank outside the world": {"rank_arg": {"1": 3}},
        # The check's settings are its own: stock's error about the rank comes first.
        "rank outside the world, invalid mode": {"rank_arg": {"1": 3}, "env": {"1": {CHECK_MODE_ENV: "maybe"}}},
    }

    def test_argument_errors_fail_at_once_as_on_stock(self) -> None:
        # A rank that waited for the absent peer would fail at its timeout (10 s), within the job's wall (30 s).
        jobs = [{"world_size": 2, "init": "hashstore", "timeout": 10, "started": [1], "wall": 30, **args}
                for args in self.ARGUMENT_ERRORS.values()]
        patched, stock = run_jobs(PATCHED_PY, jobs)[0], run_jobs(STOCK_PYTHON, jobs)[0]
        for name, patched_job, stock_job in zip(self.ARGUMENT_ERRORS, patched, stock):
            with self.subTest(name):
                self.assertEqual((len(patched_job), len(stock_job)), (1, 1), (name, patched_job, stock_job))
                self.assertFalse(stock_job[0]["ok"], stock_job)
                self.assertEqual(patched_job[0]["error_type"], stock_job[0]["error_type"], patched_job)
                self.assertLess(patched_job[0]["seconds"], 5.0, patched_job)

    def test_rank_outside_the_world_fails_at_once_with_stocks_error(self) -> None:
        job = {"world_size": 2, "init": "hashstore", "timeout": 60, "started": [0], "rank_arg": {"0": 3}}
        patched, stock = self.both(job)
        self.assertIn("rank < size. 3 vs 2", stock[0]["error"])
        self.assertEqual(
            (patched[0]["error_type"], patched[0]["error"]), (stock[0]["error_type"], stock[0]["error"])
        )
        self.assertLess(patched[0]["seconds"], 5.0)


class TestModes(TestCase):
    """Ranks in different modes never part ways: the strictest mode present
    decides on every rank, and a rank with the check off is a rank without it."""

    def test_warn_and_error_fail_together(self) -> None:
        job = {
            "world_size": 2, "init": "env", "timeout": 60,
            "env": {"0": {CHECK_MODE_ENV: "warn"}, "1": {VERSION_OVERRIDE_ENV: "2"}},
        }
        outcomes, _ = run_job(PATCHED_PY, job)
        for outcome in outcomes:
            self.assertEqual(outcome["error_type"], "ProtocolVersionError", outcome)
            self.assertIn(MISMATCH, outcome["error"])
            self.assertLess(outcome["seconds"], 15.0)

    def test_warn_and_warn_go_on(self) -> None:
        job = {
            "world_size": 2, "init": "env", "timeout": 60,
            "env": {"0": {CHECK_MODE_ENV: "warn"}, "1": {CHECK_MODE_ENV: "warn", VERSION_OVERRIDE_ENV: "2"}},
        }
        outcomes, log = run_job(PATCHED_PY, job)
        self.assertEqual([o.get("sum") for o in outcomes], [2.0, 2.0], outcomes)
        self.assertEqual(log.count("=warn: continuing anyway"), 2)

    def test_off_beside_error_is_a_rank_without_the_check(self) -> None:
        job = {"world_size": 2, "init": "env", "timeout": 60, "env": {"0": {CHECK_MODE_ENV: "off"}}}
        outcomes, log = run_job(PATCHED_PY, job)
        self.assertEqual([o.get("sum") for o in outcomes], [2.0, 2.0], outcomes)
        self.assertIn("rank 0 runs a build without the protocol version check", log)

    def test_off_rank_is_seen_when_the_group_is_named_by_a_hash(self) -> None:
        # init_process_group(_ranks=...) names the default group by a hash: the
        # hook passes the group's name, so the rank without the check is still seen.
        job = {"world_size": 2, "init": "env", "timeout": 60, "private_ranks": True,
               "env": {"0": {CHECK_MODE_ENV: "off"}}}
        outcomes, log = run_job(PATCHED_PY, job)
        self.assertEqual([o.get("sum") for o in outcomes], [2.0, 2.0], outcomes)
        self.assertIn("rank 0 runs a build without the protocol version check", log)
        self.assertLess(max(o["seconds"] for o in outcomes), 15.0)

    def test_off_beside_a_newer_minimum_is_refused(self) -> None:
        # Rank 1 requires version 2; rank 0 checks nothing, so it counts as version 1.
        job = {
            "world_size": 2, "init": "env", "timeout": 8, "wall": 30,
            "env": {"0": {CHECK_MODE_ENV: "off"}, "1": {VERSION_OVERRIDE_ENV: "2"}},
        }
        outcomes, _ = run_job(PATCHED_PY, job)
        self.assertEqual(outcomes[1]["error_type"], "ProtocolVersionError", outcomes)
        self.assertIn("taken as version 1: rank 0", outcomes[1]["error"])
        self.assertIn(f"If rank 0 runs such a build with {CHECK_MODE_ENV}=off, unset it there", outcomes[1]["error"])
        self.assertLess(outcomes[1]["seconds"], 6.0)  # rank 0 waits in gloo until its timeout, 8 s


class TestNamingTheRightRank(TestCase):
    """On a timeout every rank names the ranks that never arrived, and never
    suggests that a present rank died."""

    def test_torchrun_rank_0_late_rank_2_missing(self) -> None:
        worker = (
            "import os, time, datetime, torch.distributed as dist\n"
            "rank = int(os.environ['RANK'])\n"
            "time.sleep({0: 3, 2: 14}.get(rank, 0))\n"  # the scene: rank 0 late, rank 2 after the 10 s timeout
            "dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=10))\n"
        )
        env = {k: v for k, v in os.environ.items() if k not in GUARDRAIL_ENVS}
        proc, timed_out = run_in_own_session(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
             "--no-python", sys.executable, "-c", worker],
            timeout=90, env=env,
        )
        self.assertFalse(timed_out)
        errors = [line for line in proc.stdout.splitlines() if "DistStoreError: " in line]
        self.assertTrue(errors, proc.stdout[-3000:])
        for line in errors:
            self.assertIn("rank 2 never published", line)
            self.assertNotRegex(line, DIED)
        self.assertNotEqual(proc.returncode, 0)

    def test_rank_0_waiting_for_store_clients(self) -> None:
        # Rank 0 hosts the env:// store and waits for its 3rd client, which never comes.
        job = {"world_size": 3, "init": "env", "timeout": 5, "started": [0, 1], "wall": 30}
        outcomes, _ = run_job(PATCHED_PY, job)
        self.assertIn("2/3 clients joined", outcomes[0]["error"])  # stock's own wait speaks
        self.assertEqual(outcomes[1]["error_type"], "DistStoreError")
        # Rank 1 got no verdict: it names rank 0, still waiting in the store, and rank 2.
        self.assertIn("on rank 1: ranks 0,2 never published a protocol version", outcomes[1]["error"])
        self.assertIn("rank 0 collects every rank's version", outcomes[1]["error"])
        self.assertEqual(named_absent(outcomes[1]["error"]), {0, 2})
        self.assertNotRegex(outcomes[1]["error"], DIED)

    def test_rank_arriving_after_rank_0_gave_up_fails_at_once_naming_the_give_up(self) -> None:
        # Rank 0 gave up on rank 2. Rank 2 then comes, to the same check (its first
        # call with this store): the verdict reached without it is still there, so it
        # fails at once, with rank 0's account, instead of waiting out its timeout.
        store = dist.HashStore()
        early = RankThreads(3, timeout_s=1.0).start({0: store, 1: store}).join()
        self.assertTrue(all(isinstance(o.exception, dist.DistStoreError) for o in early.values()), early)
        threads = RankThreads(3, timeout_s=20.0).start({2: store})
        late = threads.join()[2]
        self.assertIsInstance(late.exception, dist.DistStoreError, late)
        self.assertLess(late.finished - threads.released_wall, 5.0, "the late rank waited for its timeout")
        self.assertIn(
            "rank 2 arrived after rank 0 had reached its verdict without it: rank 0 gave up waiting for it", late.error
        )
        self.assertEqual(named_absent(late.error), {2})  # rank 0's account, quoted

    def test_no_false_warnings_about_acknowledgements(self) -> None:
        # A plain timeout logs no warning about the others' reading (or not) of the verdict.
        store = dist.HashStore()
        with self.assertNoLogs("torch.distributed._protocol_version", logging.WARNING):
            outcomes = RankThreads(3, timeout_s=1.0).start({0: store, 1: store}).join()
        self.assertTrue(all(isinstance(o.exception, dist.DistStoreError) for o in outcomes.values()))

    @settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        offsets=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=5),
        absent=st.sets(st.integers(0, 4), max_size=2),
    )
    def test_arrival_skew(self, offsets: list[float], absent: set[int]) -> None:
        """Offsets inside the timeout pass, as on stock; with ranks absent, every
        rank names exactly those."""
        world_size = len(offsets)
        absent = {r for r in absent if r < world_size}
        store = dist.HashStore()
        threads = RankThreads(world_size, timeout_s=2.5)
        for rank in sorted(range(world_size), key=lambda r: offsets[r]):
            if rank not in absent:
                threads.start({rank: store})
                time.sleep(offsets[rank] / world_size)  # the arrival spread is the rule under test
        outcomes = threads.join()
        for rank, outcome in outcomes.items():
            if not absent:
                self.assertEqual(outcome.value, pv.PROTOCOL_VERSION, outcome.error)
                continue
            self.assertIsInstance(outcome.exception, dist.DistStoreError, outcome.error)
            self.assertEqual(named_absent(str(outcome.exception)), absent, f"rank {rank}: {outcome.error}")
            self.assertNotRegex(str(outcome.exception), DIED)


def expand(ranks: str) -> set[int]:
    out: set[int] = set()
    for span in ranks.split(","):
        first, _, last = span.partition("-")
        out.update(range(int(first), int(last or first) + 1))
    return out


def named_absent(message: str) -> set[int]:
    """The ranks a timeout message says never arrived (rank 0's account, or that of a
    rank that got no verdict, which names rank 0 too when it never published)."""
    found = re.search(r"[Rr]anks? ([0-9,\-]+) never published", message)
    return expand(found.group(1)) if found else set()


def init_on_server(rank: int, world_size: int, port: int) -> bool:
    """``init_process_group`` on a client of the test's own store server; destroy."""
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    dist.destroy_process_group()
    return True


class TestBackendLayout(TestCase):
    def test_gloo_writes_the_key_the_slow_path_looks_for(self) -> None:
        """Ranks without the check are seen (by the watcher) through the key gloo writes
        for each rank as it starts building, ``pv.gloo_key``. If a new torch moves that
        key, this fails loudly."""
        server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        results = spawn_ranks(init_on_server, 2, args=(server.port,))
        self.assertTrue(all(r.ok for r in results), results)
        key = pv.gloo_key("0", "cpu")
        self.assertTrue(server.check([key(0), key(1)]), [key(0), key(1)])


class TestSharedStore(TestCase):
    def test_concurrent_checks_leave_the_timeout_alone(self) -> None:
        store = dist.HashStore()
        store.set_timeout(timedelta(minutes=5))
        outcomes = RankThreads(64, timeout_s=10.0).start(dict.fromkeys(range(64), store)).join()
        self.assertEqual({o.value for o in outcomes.values()}, {pv.PROTOCOL_VERSION})
        self.assertEqual(store.timeout, timedelta(minutes=5))

    def test_another_user_of_the_store_never_sees_its_timeout_change(self) -> None:
        # Rank 2 never comes, so rank 0 waits for it and rank 1 for the verdict until
        # their timeout, on a PrefixStore over a store that another thread uses with
        # its own 77 s timeout; that thread looks all along.
        root = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=77))
        checked = dist.PrefixStore("job", root)
        seen: set[timedelta] = set()
        threads = RankThreads(3, timeout_s=2.5).start({0: checked, 1: checked})
        while not threads.done():
            seen.add(root.timeout)
            seen.add(checked.timeout)
        outcomes = threads.join()
        self.assertTrue(all(isinstance(o.exception, dist.DistStoreError) for o in outcomes.values()), outcomes)
        self.assertEqual(seen, {timedelta(seconds=77)})

    def test_threads_sharing_one_client_keep_their_timeout(self) -> None:
        # Two ranks on one TCPStore client object, the third never comes. A client
        # serialises its calls and each rank's wait is one blocking call: the second
        # rank's wait starts when the first's ends, so they give up one after the other.
        server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
        client = dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=60))
        threads = RankThreads(3, timeout_s=3.0).start({0: client, 1: client}, together=True)
        for outcome in threads.join().values():
            self.assertIsInstance(outcome.exception, dist.DistStoreError, outcome)
            self.assertLess(outcome.finished - threads.released_wall, 2 * 3.0 + 2.0)


class TestErrorTypes(TestCase):
    """Elastic agents and retry code catch DistStoreError and DistNetworkError."""

    def test_timeout_is_a_dist_store_error(self) -> None:
        with self.assertRaisesRegex(dist.DistStoreError, "rank 1 never published"):
            pv.check_protocol_version(dist.HashStore(), 0, 2, timedelta(seconds=0.5))

    def test_lost_store_keeps_its_error_type(self) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-c", (
                "import sys, time, torch.distributed as dist\n"
                "s = dist.TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False)\n"
                "print(s.port, flush=True); time.sleep(60)\n"
            )],
            stdout=subprocess.PIPE, text=True,
        )
        try:
            port = int(proc.stdout.readline())
            store = dist.TCPStore("127.0.0.1", port, is_master=False)
            threading.Timer(1.0, proc.kill).start()
            with self.assertRaises(dist.DistNetworkError) as caught:
                pv.check_protocol_version(store, 1, 2, timedelta(seconds=30))
            self.assertIn("protocol version check on rank 1: the store failed while", str(caught.exception))
        finally:
            proc.kill()
            proc.wait()


class TestSettingsAndArguments(TestCase):
    def test_huge_override_names_the_variable(self) -> None:
        with mock.patch.dict(os.environ, {VERSION_OVERRIDE_ENV: "9" * 5000}):
            with self.assertRaisesRegex(pv.SettingError, f"^{VERSION_OVERRIDE_ENV}="):
                version_range(C10D)[1]

    def test_bad_override_fails_init_in_every_mode(self) -> None:
        # Like the CLI: a typo in a guardrail variable is an error even with the check off.
        for mode in ("off", "warn", "error"):
            with mock.patch.dict(os.environ, {VERSION_OVERRIDE_ENV: "two", CHECK_MODE_ENV: mode}):
                with self.assertRaisesRegex(pv.SettingError, VERSION_OVERRIDE_ENV):
                    store = dist.HashStore()
                    pv._check_protocol_version(store, store, 0, 2, timedelta(seconds=5), "gloo", "cpu", "0", True)

    def test_fake_backend_reads_no_setting(self) -> None:
        with mock.patch.dict(os.environ, {CHECK_MODE_ENV: "bogus"}):
            store = dist.HashStore()
            pv._check_protocol_version(store, store, 0, 2, timedelta(seconds=5), "fake", "cpu", "0", True)

    def test_backend_this_build_cannot_make_fails_at_once(self) -> None:
        # Stock refuses these before any peer is needed; the check must not wait first.
        lacking = [("bogus", "Unknown backend type bogus"), ("xccl", "doesn't have XCCL built in")]
        lacking += [] if dist.is_nccl_available() else [("nccl", "doesn't have NCCL built in")]
        for backend, error in lacking:
            started = time.monotonic()
            with self.assertRaisesRegex((AssertionError, RuntimeError), error):
                dist.init_process_group(backend, store=dist.HashStore(), rank=1, world_size=2, timeout=timedelta(seconds=30))
            self.assertLess(time.monotonic() - started, 5.0)

    def test_helper_argument_types(self) -> None:
        self.assertRaisesRegex(TypeError, "store must be", pv.check_protocol_version, None, 0, 2)
        self.assertRaisesRegex(TypeError, "rank must be an int, got bool", pv.check_protocol_version, dist.HashStore(), True, 2)

    def test_timeout_must_be_a_timedelta(self) -> None:
        with self.assertRaisesRegex(TypeError, "timeout must be a datetime.timedelta, got int 5"):
            pv.check_protocol_version(dist.HashStore(), 0, 2, timeout=5)  # type: ignore[arg-type]


class TestQuietStore(TestCase):
    def test_tiny_timeout_logs_one_store_warning_at_most(self) -> None:
        # A TCPStore logs two lines per timed-out call; the check never makes
        # calls shorter than 50 ms, and only one of them may time out.
        script = (
            "import datetime, torch.distributed as dist\n"
            "from torch.distributed._protocol_version import check_protocol_version\n"
            "s = dist.TCPStore('127.0.0.1', 0, 2, True, wait_for_workers=False)\n"
            "try:\n"
            "    check_protocol_version(s, 0, 2, datetime.timedelta(milliseconds=1))\n"
            "except dist.DistStoreError as e:\n"
            "    print('DistStoreError', e)\n"
        )
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        self.assertIn("DistStoreError", proc.stdout, proc.stderr)
        self.assertLessEqual(proc.stderr.count("socket.cpp"), 2, proc.stderr)


class TestMessageSize(TestCase):
    """Every list in a message is capped: a few KB at 100,000 ranks."""

    def test_scattered_missing_ranks(self) -> None:
        info = rank_info(0, 1)
        check = _exchange._Check(
            store=dist.HashStore(), family=C10D, namespace="c10d/0/0", rank=0, world_size=100_000,
            timeout=timedelta(seconds=60), end=time.monotonic() + 60, grace=1.0, bounded=False, patient=False, backend="gloo", info=info,
            payload=info.to_payload(C10D), trace=pv.gloo_key("0", "cpu"),
        )
        missing = list(range(1, 100_000, 2))
        # Every other present rank was seen without the check, through gloo's key.
        raws = {r: _exchange.NO_CHECK.encode() if r % 4 == 2 else b"{}" for r in range(2, 100_000, 2)}
        detail = _exchange._verdict_on(check, {0: info.to_payload(C10D).encode(), **raws}, missing).detail
        self.assertLess(len(detail), 4096)
        self.assertIn("and 49984 more never published", detail)
        # A rank that got no verdict names the same ranks, rank 0 among them, as briefly.
        detail = _messages.no_verdict(C10D, 2, [0, *missing], traceless=True)
        self.assertLess(len(detail), 4096)
        self.assertIn("ranks 0-1,3,5,", detail)
        self.assertIn("and 49984 more never published", detail)

    def test_many_builds_and_hosts(self) -> None:
        infos = [rank_info(r, 1 + r % 2, host=f"host-{r}") for r in range(100_000)]
        infos += [rank_info(100_000 + r, 3, min_version=3, host="h") for r in range(0, 40, 3)]
        verdict = _judge.judge(C10D, infos, "gloo")
        self.assertEqual(verdict.status, "mismatch")
        self.assertLess(len(verdict.detail), 4096)


# --------------------------------------------------------------------------- #
# Any backend, any store, any earlier attempt
# --------------------------------------------------------------------------- #


def init_and_all_reduce(rank: int, world_size: int, port: int, kind: str) -> float:
    """``init_process_group`` on a plugin backend (``kind="plugin"``; ``"ucc"``: one registered under the name of
    a built-in backend this build lacks) or on a store with only set/get/wait (``kind="minimal"``), then one
    all_reduce."""
    import torch

    store: dist.Store = dist.TCPStore("127.0.0.1", port, world_size, rank == 0, timeout=timedelta(seconds=60))
    backend = "gloo"
    if kind == "plugin":
        backend = register_traceless_backend()
    elif kind == "ucc":
        backend = kind
        dist.Backend.register_backend(kind, lambda *args: dist.ProcessGroupGloo(*args), devices=["cpu"])
    else:
        store = MinimalStore(store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        tensor = torch.ones(1)
        dist.all_reduce(tensor)
        return tensor.item()
    finally:
        dist.destroy_process_group()


class TestPluginBackend(TestCase):
    def test_a_plugin_under_the_name_of_a_built_in_this_build_lacks_is_checked(self) -> None:
        # The torch_ucc plugin on a build without UCC: a built-in this build lacks is left to stock's own refusal,
        # but a plugin in its place runs, and is checked.
        self.assertFalse(dist.is_ucc_available())
        mixed = spawn_ranks(init_and_all_reduce, 2, args=(find_free_port(), "ucc"), rank_env={1: {VERSION_OVERRIDE_ENV: "2"}})
        for result in mixed:
            self.assertEqual(result.error_type, "ProtocolVersionError", result)
            self.assertIn("(backend ucc)", result.error)

    def test_a_plugin_backend_is_checked_like_gloo(self) -> None:
        mixed = spawn_ranks(init_and_all_reduce, 2, args=(find_free_port(), "plugin"), rank_env={1: {VERSION_OVERRIDE_ENV: "2"}})
        for result in mixed:
            self.assertEqual(result.error_type, "ProtocolVersionError", result)
            self.assertIn(f"(backend {TRACELESS_BACKEND})", result.error)
        matching = spawn_ranks(init_and_all_reduce, 2, args=(find_free_port(), "plugin"))
        self.assertEqual([r.value for r in matching], [2.0, 2.0], matching)


class MinimalStore(dist.Store):
    """A store in Python with only what ``init_process_group`` needs of one on
    gloo: ``set``, ``get`` and ``wait`` (no ``check``, ``add``, ``compare_set``),
    over a real store that the ranks share."""

    def __init__(self, inner: dist.Store) -> None:
        super().__init__()
        self._inner = inner

    def set(self, key: str, value: Any) -> None:
        self._inner.set(key, value)

    def get(self, key: str) -> bytes:
        return self._inner.get(key)

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        self._inner.wait(keys, timeout) if timeout is not None else self._inner.wait(keys)


class LookupErrorStore(MinimalStore):
    """Times out as torchelastic's ``EtcdStore`` does: with ``LookupError``."""

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        try:
            super().wait(keys, timeout)
        except dist.DistStoreError:
            raise LookupError("Timeout while waiting for keys") from None


class TestAnyStore(TestCase):
    def test_a_store_that_times_out_with_lookup_error(self) -> None:
        """The etcd rendezvous' store: a rank later than the grace period is
        waited for, and a missing one is named at the timeout."""
        store = LookupErrorStore(dist.HashStore())
        outcomes = RankThreads(2, timeout_s=20.0, body=_arrive_after({0: 0.0, 1: 1.5})).start({0: store, 1: store}).join()
        self.assertEqual({r: o.value for r, o in outcomes.items()}, {0: 1, 1: 1}, outcomes)
        alone = RankThreads(2, timeout_s=2.0).start({0: store}).join()
        self.assertIsInstance(alone[0].exception, dist.DistStoreError, alone)
        self.assertIn("rank 1 never published", alone[0].error)


    def test_a_store_with_only_set_get_and_wait(self) -> None:
        # Checks one after another on one such store, the way a framework calls
        # the helper before each group it builds: each is judged on its own.
        store = MinimalStore(dist.HashStore())
        for _ in range(3):
            outcomes = RankThreads(3, timeout_s=20.0).start(dict.fromkeys(range(3), store)).join()
            self.assertEqual({r: o.value for r, o in outcomes.items()}, {0: 1, 1: 1, 2: 1}, outcomes)
        late = RankThreads(3, timeout_s=3.0).start({0: store, 1: store}).join()
        for outcome in late.values():
            self.assertIsInstance(outcome.exception, dist.DistStoreError, outcome)
            self.assertIn("rank 2 never published", outcome.error)

    def test_init_process_group_on_a_store_with_only_set_get_and_wait(self) -> None:
        mixed = spawn_ranks(init_and_all_reduce, 2, args=(find_free_port(), "minimal"), rank_env={1: {VERSION_OVERRIDE_ENV: "2"}})
        self.assertEqual([r.error_type for r in mixed], ["ProtocolVersionError"] * 2, mixed)
        matching = spawn_ranks(init_and_all_reduce, 2, args=(find_free_port(), "minimal"))
        self.assertEqual([r.value for r in matching], [2.0, 2.0], matching)


# What an earlier attempt of a 3-rank job, run by fresh processes without a fresh
# prefix, may leave on the store: each attempt's ranks make their first call with
# a store object of their own, so every attempt checks under one namespace.
EARLIER_ATTEMPTS = ("passed", "rank_2_absent", "rank_0_absent", "killed_before_verdict", "killed_after_verdict")
# What a rank of a reused namespace may say instead of passing: the earlier check,
# the fresh prefix it needs, or a timeout. Never a mismatch.
REUSE_ACCOUNT = re.compile(r"earlier check under|pass a fresh store prefix per attempt|timed out after")


def _fresh_process_store(base: dist.Store) -> dist.Store:
    """The store a fresh process of the job builds: a new object over the same keys."""
    return dist.PrefixStore("job", base)


def _leave_behind(base: dist.Store, attempt: str) -> dict[int, ThreadOutcome]:
    """Run (or, for a killed attempt, write by hand) an earlier attempt on ``base``."""
    store = _fresh_process_store(base)
    namespace, _ = pv._attempt_namespace("check", 0)
    payload = rank_info(0, 1).to_payload(C10D)
    if attempt == "passed":
        return RankThreads(3, timeout_s=10.0).start(dict.fromkeys(range(3), store)).join()
    if attempt in ("rank_2_absent", "rank_0_absent"):
        present = (0, 1) if attempt == "rank_2_absent" else (1, 2)
        return RankThreads(3, timeout_s=0.5).start(dict.fromkeys(present, store)).join()
    if attempt == "killed_before_verdict":  # rank 0 and rank 1 published, then the job was killed
        store.multi_set([C10D.key(namespace, "rank", r) for r in (0, 1)], [payload] * 2)
    else:  # rank 0 published a pass and rank 1 read it; the job was killed before rank 2 did
        verdict = _judge.judge(C10D, [rank_info(r, 1) for r in range(3)], "unknown")
        store.multi_set(
            [C10D.key(namespace, "rank", 0), C10D.key(namespace, "rank", 2), C10D.key(namespace, "verdict")],
            [payload, payload, dataclasses.replace(verdict, readers=2).to_json()],
        )
        store.add(C10D.key(namespace, "read"), 1)
    return {}


def _arrive_after(delays: dict[int, float], timeout_s: float = 20.0) -> Any:
    def body(store: dist.Store, rank: int, world_size: int) -> int:
        time.sleep(delays[rank])  # the arrival itself, not a synchronisation
        return pv.check_protocol_version(store, rank, world_size, timedelta(seconds=timeout_s))

    return body


class TestLongLivedStore(TestCase):
    def assert_pass_or_reuse_account(self, outcomes: dict[int, ThreadOutcome]) -> None:
        """Every rank returned the version, or raised a DistStoreError that names the
        earlier check, asks for a fresh prefix or timed out; none a false mismatch."""
        for rank, outcome in outcomes.items():
            if outcome.exception is None:
                self.assertEqual(outcome.value, pv.PROTOCOL_VERSION, f"rank {rank}")
                continue
            self.assertNotIsInstance(outcome.exception, pv.ProtocolVersionError, f"rank {rank}: {outcome.error}")
            self.assertIsInstance(outcome.exception, dist.DistStoreError, f"rank {rank}: {outcome.error}")
            self.assertRegex(outcome.error, REUSE_ACCOUNT, f"rank {rank}")

    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        earlier=st.lists(st.sampled_from(EARLIER_ATTEMPTS), max_size=3),
        delays=st.lists(st.floats(0.0, 2.5), min_size=3, max_size=3),
    )
    def test_a_new_attempt_without_a_fresh_prefix_passes_or_says_why_never_a_mismatch(
        self, earlier: list[str], delays: list[float]
    ) -> None:
        """Earlier attempts of the job, each by fresh processes (a new store object over
        the same keys), passed, timed out with a rank absent or were killed mid-check;
        every rank of a new one arrives within its timeout, in any order. Each rank
        passes or raises a clear DistStoreError (the earlier check, a fresh prefix, a
        timeout), never a ProtocolVersionError. A passed check leaves nothing, so after
        attempts that all passed, the new one passes and leaves nothing either."""
        base = dist.HashStore()
        for attempt in earlier:
            left = _leave_behind(base, attempt)
            self.assert_pass_or_reuse_account(left)
            if set(earlier) == {"passed"}:
                self.assertEqual([o.value for o in left.values()], [1, 1, 1], left)
                self.assertEqual(base.num_keys(), 0)
        store = _fresh_process_store(base)
        threads = RankThreads(3, timeout_s=6.0, body=_arrive_after(dict(enumerate(delays)), timeout_s=6.0))
        outcomes = threads.start(dict.fromkeys(range(3), store)).join()
        self.assert_pass_or_reuse_account(outcomes)
        if set(earlier) <= {"passed"}:
            self.assertEqual({r: o.value for r, o in outcomes.items()}, {0: 1, 1: 1, 2: 1}, outcomes)
            self.assertEqual(base.num_keys(), 0)

    def test_a_check_killed_mid_way_is_named_to_the_next_attempt(self) -> None:
        # The likeliest reuse: an attempt killed while it checked, then a new one
        # without a fresh prefix. Every rank says so, at once, naming the namespace.
        base = dist.HashStore()
        _leave_behind(base, "killed_before_verdict")
        threads = RankThreads(3, timeout_s=20.0).start({r: _fresh_process_store(base) for r in range(3)})
        outcomes = threads.join()
        namespace = C10D.key(pv._attempt_namespace("check", 0)[0])
        for rank, outcome in outcomes.items():
            self.assertIsInstance(outcome.exception, dist.DistStoreError, f"rank {rank}: {outcome.error}")
            self.assertIn(f"the store already holds an earlier check under {namespace}", outcome.error)
            self.assertIn("Pass a fresh store or a fresh PrefixStore prefix per attempt.", outcome.error)
            self.assertLess(outcome.finished - threads.released_wall, 5.0, f"rank {rank} waited for its timeout")
        # The same ranks with a fresh prefix pass.
        fresh = dist.PrefixStore("attempt-2", base)
        outcomes = RankThreads(3, timeout_s=20.0).start(dict.fromkeys(range(3), fresh)).join()
        self.assertEqual({r: o.value for r, o in outcomes.items()}, {0: 1, 1: 1, 2: 1}, outcomes)


class TestReinitOnOneStore(TestCase):
    def test_rank_0_late_for_a_second_init_is_waited_for_without_a_warning(self) -> None:
        # A first group passed its check on this store and built gloo, which left
        # each rank's key. Now ranks 1-2 init again and rank 0 comes late, past the
        # grace period: they must wait for its check, not take its old gloo key for
        # a build without one; and each rank deletes its own stale key, which gloo
        # would otherwise read as its address. (The hook itself, on threads, which
        # stand for the processes of the job: each thread counts its own inits.)
        store = dist.HashStore()

        def hook(store: dist.Store, rank: int, world_size: int, earlier: int = 0) -> int:
            for _ in range(earlier):  # this thread stands for a process that made earlier inits
                next(pv._thread_inits.count)
            group_store = dist.PrefixStore("0/", store)  # what init registers the group with
            pv._check_protocol_version(store, group_store, rank, world_size, timedelta(seconds=20), "gloo", "cpu", "0", True)
            return pv._negotiated[group_store]

        key = pv.gloo_key("0", "cpu")
        with mock.patch.object(pv, "_process_inits", itertools.count()):
            first = RankThreads(3, 20.0, hook).start(dict.fromkeys(range(3), store)).join()
            self.assertEqual({r: o.value for r, o in first.items()}, {0: 1, 1: 1, 2: 1}, first)
            store.multi_set([key(r) for r in range(3)], ["address"] * 3)  # what gloo left
            second = RankThreads(3, 20.0, functools.partial(hook, earlier=1))
            with self.assertNoLogs("torch.distributed._protocol_version", logging.WARNING):
                second.start({1: store, 2: store})
                namespace, first_init = pv._attempt_namespace("c10d", 1)
                self.assertFalse(first_init)
                store.wait([C10D.key(namespace, "rank", r) for r in (1, 2)], timedelta(seconds=20))
                time.sleep(2.0)  # rank 0 is late, past the 1 s grace period: the scenario, not a synchronisation
                self.assertEqual([store.check([key(r)]) for r in range(3)], [True, False, False])
                outcomes = second.start({0: store}).join()
        self.assertEqual({r: o.value for r, o in outcomes.items()}, {0: 1, 1: 1, 2: 1}, outcomes)
        self.assertFalse(any(store.check([key(r)]) for r in range(3)))
        self.assertEqual(store.num_keys(), 0)


def init_again_and_again(rank: int, world_size: int, port: int, cycles: int) -> list[int]:
    """``cycles`` times, on one client of the test's store server: init gloo, one
    all_reduce, destroy. Returns the version each group negotiated."""
    import torch

    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))
    versions = []
    for _ in range(cycles):
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=30))
        try:
            tensor = torch.ones(1)
            dist.all_reduce(tensor)
            assert tensor.item() == world_size, tensor
            versions.append(pv.get_group_protocol_version())
        finally:
            dist.destroy_process_group()
    return versions


class TestBoundedStore(TestCase):
    def test_a_hundred_inits_on_one_tcpstore_all_run_and_leave_only_gloos_two_keys(self) -> None:
        # On stock torch re-init on a reused store is a race: gloo may read the
        # address the previous group left, and a run of inits fails sooner or later
        # (Connection refused / Connect timeout in connectFullMesh). Here every init
        # is checked (it negotiates a version) and each rank deletes its stale key
        # before the check lets anyone build gloo, so all 100 run; and every check
        # removes its keys, so the store ends with gloo's 2 address keys alone.
        cycles = 100
        server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        results = spawn_ranks(init_again_and_again, 2, args=(server.port, cycles), timeout=90.0)
        self.assertEqual([r.value for r in results], [[pv.PROTOCOL_VERSION] * cycles] * 2, results)
        gloo = pv.gloo_key("0", "cpu")
        self.assertTrue(server.check([gloo(0), gloo(1)]))
        self.assertEqual(server.num_keys(), 2)
        for count in (0, 1, cycles // 2, cycles - 1, cycles):
            namespace, _ = pv._attempt_namespace("c10d", count)
            for key in ("rank/0", "rank/1", "verdict", "read", "left"):
                self.assertFalse(server.check([C10D.key(namespace, key)]), (namespace, key))


class TestCoreImports(TestCase):
    # What ``init_process_group`` loads of the guardrail, and what loads only with
    # its own entry point (init_rpc, torchrun's agent, the CLI and its preflight).
    CORE = ("", "._exchange", "._families", "._judge", "._messages", "._payload", "._settings", "._store", "._versions")
    ENTRY_POINTS = ("._agent", "._cli", "._preflight", "._rpc")
    # Issue #21 asks for at most 1000 lines with the RPC and agents' modules; not reached yet, so a ratchet: lower
    # it when the core shrinks; raising it needs a reason here (1150 until the workers learnt to read torchrun's
    # agents' word, which they do in the core; 1183 until the backend skip became a named predicate, on review;
    # 1187 until it learnt ProcessGroupNCCL's refusal without GPUs, which the suite on torch 2.14.1 found; 1191
    # until a restarted rank 0 of torchrun's static rendezvous took over the check its stopped predecessor left).
    MAX_CORE_LINES = 1195

    def test_init_process_group_loads_only_the_core(self) -> None:
        script = (
            "import sys, torch.distributed\n"
            "before = set(sys.modules)\n"
            "import torch.distributed._protocol_version\n"
            "new = sorted(set(sys.modules) - before)\n"
            "files = [sys.modules[m].__file__ for m in new if m.startswith('torch.distributed._protocol_version')]\n"
            "print(new)\n"
            "print(sum(sum(1 for _ in open(f)) for f in files))\n"
        )
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
        modules, lines = proc.stdout.strip().splitlines()[-2:]
        loaded = set(ast.literal_eval(modules))
        package = "torch.distributed._protocol_version"
        self.assertEqual({m for m in loaded if m.startswith(package)}, {package + m for m in self.CORE})
        for entry_point in self.ENTRY_POINTS:  # real modules, so that their absence means something
            self.assertIsNotNone(importlib.util.find_spec(package + entry_point), entry_point)
        self.assertFalse({m for m in loaded if m.startswith(("torch.distributed.elastic", "torch.distributed.rpc"))})
        self.assertLessEqual(int(lines), self.MAX_CORE_LINES)


if __name__ == "__main__":
    run_tests()
