# Owner(s): ["oncall: distributed"]
"""Off the happy path, never worse than stock torch.

The same job runs on the fork (``.venv``) and on stock torch (``.venv-stock``, the
same wheel without the hook): whatever stock runs, the fork runs; whatever stock
refuses at once, the fork refuses at once. Then the paths stock has no opinion
on, because it has no check: late and missing ranks named correctly on every
rank, ranks in different modes, a shared store's timeout, the types of errors.
"""

from __future__ import annotations

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
from torch.distributed._protocol_version import _diagnose, _judge, _messages, _store
from torch.distributed._protocol_version._families import C10D
from torch.distributed._protocol_version._payload import Verdict
from torch.testing._internal.common_utils import find_free_port, run_tests, TestCase
from torch.testing._internal.distributed import protocol_version_job
from torch.testing._internal.distributed.protocol_version_utils import (
    CHECK_MODE_ENV,
    GUARDRAIL_ENVS,
    MISMATCH,
    NO_STOCK_REASON,
    OLD_PAYLOAD,
    rank_info,
    RankThreads,
    run_in_own_session,
    spawn_ranks,
    STOCK_PYTHON,
    ThreadOutcome,
    VERSION_OVERRIDE_ENV,
)


# The job imports only torch, so stock torch can run the file as a script.
JOB = Path(protocol_version_job.__file__).resolve()
PATCHED_PY = Path(sys.executable)
# Said of a rank that is present and waiting: never that it may have died.
DIED = re.compile(r"died|may not have started")


def run_job(python: Path, job: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Run ``protocol_version_job.py`` with ``python``; its rank outcomes
    and its log output."""
    env = {k: v for k, v in os.environ.items() if k not in GUARDRAIL_ENVS}
    proc, timed_out = run_in_own_session(
        [str(python), str(JOB), json.dumps(job), str(find_free_port())],
        timeout=float(job.get("wall", 120)) + 60, env=env,
    )
    assert not timed_out, proc.stdout[-3000:]
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]), "\n".join(lines[:-1])


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
        # Near the deadline the slow path looks more often, and a rank whose
        # deadline passes while the verdict on a complete job is in flight waits
        # for it: the job runs, as on stock.
        job = {"world_size": 3, "init": "tcpstore", "timeout": 10, "delays": {"2": 9.8}}
        patched, _ = run_job(PATCHED_PY, job)
        self.assertEqual([o.get("sum") for o in patched], [3.0] * 3, patched)

    def test_rank_0_late_on_env(self) -> None:
        job = {"world_size": 3, "init": "env", "timeout": 10, "delays": {"0": 3}}
        patched, stock = self.both(job)
        self.assertEqual([o.get("sum") for o in patched], [3.0] * 3, patched)
        self.assertEqual([o.get("sum") for o in stock], [3.0] * 3, stock)

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
            self.assertEqual(outcome["error_type"], "RuntimeError", outcome)
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
            "world_size": 2, "init": "env", "timeout": 20, "wall": 40,
            "env": {"0": {CHECK_MODE_ENV: "off"}, "1": {VERSION_OVERRIDE_ENV: "2"}},
        }
        outcomes, _ = run_job(PATCHED_PY, job)
        self.assertEqual(outcomes[1]["error_type"], "RuntimeError", outcomes)
        self.assertIn("taken as version 1: rank 0", outcomes[1]["error"])
        self.assertIn(f"If rank 0 runs such a build with {CHECK_MODE_ENV}=off, unset it there", outcomes[1]["error"])
        self.assertLess(outcomes[1]["seconds"], 10.0)


class TestNamingTheRightRank(TestCase):
    """On a timeout every rank names the ranks that never arrived, and never
    suggests that a present rank died."""

    def test_torchrun_rank_0_late_rank_2_missing(self) -> None:
        worker = (
            "import os, time, datetime, torch.distributed as dist\n"
            "rank = int(os.environ['RANK'])\n"
            "time.sleep({0: 3, 2: 14}.get(rank, 0))\n"
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
        self.assertIn("rank 0, which collects every rank's version, has not opened the check", outcomes[1]["error"])
        self.assertIn("Rank 2 never published", outcomes[1]["error"])
        self.assertNotRegex(outcomes[1]["error"], DIED)

    def test_rank_arriving_after_the_verdict_reports_it_at_once(self) -> None:
        server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        client = lambda: dist.TCPStore("127.0.0.1", server.port, is_master=False)  # noqa: E731
        threads = RankThreads(3, timeout_s=2.0)
        threads.start({0: client(), 1: client()})
        early = threads.join()
        late_store = client()
        started = time.monotonic()
        with self.assertRaises(dist.DistStoreError) as caught:
            pv.check_protocol_version(late_store, 2, 3, timedelta(seconds=30))
        self.assertLess(time.monotonic() - started, 3.0)
        self.assertIn("rank 2 never published", str(caught.exception))
        self.assertIn("Rank 2 arrived after rank 0 had given up waiting for it.", str(caught.exception))
        for outcome in early.values():
            self.assertIsInstance(outcome.exception, dist.DistStoreError)

    def test_second_call_on_a_reused_store_with_rank_0_late(self) -> None:
        # Call 1 timed out naming rank 2; in call 2 rank 2 comes first, rank 1 a
        # second later, rank 0 later still: rank 1 took part in call 1 and waits
        # for a new check, so rank 2 does not take call 1's verdict for its own,
        # although rank 1 came after it (its mark is left on arrival, not after
        # its own two seconds).
        store = dist.HashStore()
        first = RankThreads(3, timeout_s=2.0).start({0: store, 1: store}).join()
        self.assertTrue(all(isinstance(o.exception, dist.DistStoreError) for o in first.values()))
        second = RankThreads(3, timeout_s=20.0).start({2: store})
        time.sleep(1.0)
        second.start({1: store})
        time.sleep(2.5)
        outcomes = second.start({0: store}).join()
        self.assertEqual({r: o.value for r, o in outcomes.items()}, {0: 1, 1: 1, 2: 1}, outcomes)

    def test_ranks_late_for_the_same_check_do_not_hold_each_other(self) -> None:
        # Rank 0 gave up on ranks 2 and 3; they come together afterwards and both
        # report that verdict within the two seconds, neither waiting for a check
        # that no rank of the job will open.
        store = dist.HashStore()
        early = RankThreads(4, timeout_s=2.0).start({0: store, 1: store}).join()
        started = time.monotonic()
        late = RankThreads(4, timeout_s=30.0).start({2: store, 3: store}).join()
        # Their marks are gone: a check opened later does not count them as waiting.
        self.assertFalse(any(store.check([C10D.key(2, "waiting", r)]) for r in (2, 3)))
        for rank in (2, 3):
            self.assertIsInstance(late[rank].exception, dist.DistStoreError, late[rank])
            self.assertIn(f"Rank {rank} arrived after rank 0 had given up waiting for it.", str(late[rank].exception))
            self.assertLess(late[rank].finished - started, 10.0)  # not their own 30 s
        self.assertTrue(all(isinstance(early[r].exception, dist.DistStoreError) for r in (0, 1)))

    def test_rank_0_returns_a_pass_only_once_every_rank_has_read_it(self) -> None:
        # Rank 0 usually hosts the store: were it to go on and exit at once (a bad
        # argument stock rejects on every rank after the check), a rank that had
        # not read the verdict yet would fail with a connection error, not its own.
        store = dist.HashStore()

        def rank_0_then_look(store: dist.Store, rank: int, world_size: int) -> Any:
            version = pv.check_protocol_version(store, rank, world_size, timedelta(seconds=20))
            if rank != 0:
                return version
            return version, store.check([C10D.key(1, "ack", r) for r in range(1, world_size)])

        outcomes = RankThreads(3, 20.0, rank_0_then_look).start({r: store for r in range(3)}, together=True).join()
        self.assertEqual({r: o.value for r, o in outcomes.items()}, {0: (1, True), 1: 1, 2: 1}, outcomes)

    def _rank_1_reads_a_pass_and_never_acknowledges(self, payload: bytes) -> tuple[ThreadOutcome, float]:
        """Rank 0 as a thread (timeout 30 s); rank 1 played by hand: publish
        ``payload``, read the passing verdict, say nothing. Returns rank 0's
        outcome and the moment rank 1 had read the verdict."""
        store = dist.HashStore()
        threads = RankThreads(2, timeout_s=30.0).start({0: store})
        epoch = int(store.get(C10D.key("current")))
        store.set(C10D.key(epoch, "rank", 1), payload)
        store.set_timeout(timedelta(seconds=30))
        self.assertEqual(Verdict.from_json(store.get(C10D.key(epoch, "verdict"))).negotiated, 1)
        read = time.monotonic()
        return threads.join()[0], read

    def test_an_older_build_is_not_waited_for(self) -> None:
        # An older build of the check acknowledges only a failing verdict: rank 0
        # does not wait for its acknowledgement of a pass at all.
        with self.assertNoLogs("torch.distributed.distributed_c10d", logging.INFO):
            outcome, _ = self._rank_1_reads_a_pass_and_never_acknowledges(OLD_PAYLOAD)
        self.assertEqual(outcome.value, 1, outcome)

    def test_a_rank_dead_after_a_pass_costs_one_grace_period(self) -> None:
        # Rank 1 published, read the pass and died: rank 0 waits one grace period
        # (1 s here), then leaves rank 1 to the backend's own timeout, as stock
        # does, instead of spending its own 30 s on it first.
        payload = rank_info(1, 1).to_payload(C10D, "0123456789abcdef").encode()
        with self.assertLogs("torch.distributed.distributed_c10d", logging.INFO) as logs:
            outcome, read = self._rank_1_reads_a_pass_and_never_acknowledges(payload)
        self.assertEqual(outcome.value, 1, outcome)
        self.assertLess(outcome.finished - read, 10.0)
        self.assertIn("within 1.0s, no word from rank 1 that the verdict reached them.", "\n".join(logs.output))
        self.assertTrue(all(line.startswith("INFO:") for line in logs.output), logs.output)

    def test_no_false_warnings_about_acknowledgements(self) -> None:
        store = dist.HashStore()
        with self.assertNoLogs("torch.distributed.distributed_c10d", logging.WARNING):
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
                time.sleep(offsets[rank] / world_size)
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
    """The ranks a timeout message says never arrived (rank 0 when it never opened the check)."""
    named = set()
    found = re.search(r"[Rr]anks? ([0-9,\-]+) never published", message)
    if found:
        named |= expand(found.group(1))
    if "rank 0, which collects every rank's version, has not opened the check" in message:
        named.add(0)
    return named


def init_on_server(rank: int, world_size: int, port: int) -> bool:
    """``init_process_group`` on a client of the test's own store server; destroy."""
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    dist.destroy_process_group()
    return True


class TestBackendLayout(TestCase):
    def test_gloo_writes_the_key_the_slow_path_looks_for(self) -> None:
        """Ranks without the check are seen by the key gloo writes for each rank as
        it starts building. If a new torch moves that key, this fails loudly."""
        server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        results = spawn_ranks(init_on_server, 2, args=(server.port,))
        self.assertTrue(all(r.ok for r in results), results)
        key = _diagnose.backend_key_for("gloo", "0")
        self.assertIsNotNone(key)
        self.assertTrue(server.check([key(0), key(1)]), [key(0), key(1)])
        self.assertIsNone(_diagnose.backend_key_for("nccl", "0"))  # NCCL writes no key per rank


class TestSharedStore(TestCase):
    def test_concurrent_checks_give_the_timeout_back(self) -> None:
        store = dist.HashStore()
        store.set_timeout(timedelta(minutes=5))
        outcomes = RankThreads(64, timeout_s=10.0).start({r: store for r in range(64)}).join()
        self.assertEqual({o.value for o in outcomes.values()}, {pv.PROTOCOL_VERSION})
        self.assertEqual(store.timeout, timedelta(minutes=5))


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
            self.assertIn("protocol version check on rank 1: the rendezvous store failed while", str(caught.exception))
        finally:
            proc.kill()
            proc.wait()


class TestSettingsAndArguments(TestCase):
    def test_huge_override_names_the_variable(self) -> None:
        with mock.patch.dict(os.environ, {VERSION_OVERRIDE_ENV: "9" * 5000}):
            with self.assertRaisesRegex(pv.SettingError, f"^{VERSION_OVERRIDE_ENV}="):
                pv.get_protocol_version()

    def test_bad_override_fails_init_in_every_mode(self) -> None:
        # Like the CLI: a typo in a guardrail variable is an error even with the check off.
        for mode in ("off", "warn", "error"):
            with mock.patch.dict(os.environ, {VERSION_OVERRIDE_ENV: "two", CHECK_MODE_ENV: mode}):
                with self.assertRaisesRegex(pv.SettingError, VERSION_OVERRIDE_ENV):
                    pv._check_protocol_version(dist.HashStore(), 0, 2, timedelta(seconds=5), "gloo")

    def test_fake_backend_reads_no_setting(self) -> None:
        with mock.patch.dict(os.environ, {CHECK_MODE_ENV: "bogus"}):
            pv._check_protocol_version(dist.HashStore(), 0, 2, timedelta(seconds=5), "fake")

    def test_backend_this_build_cannot_make_fails_at_once(self) -> None:
        # Stock refuses these before any peer is needed; the check must not wait first.
        for backend, error in (("bogus", "Unknown backend type bogus"), ("nccl", "doesn't have NCCL built in")):
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

    def test_no_backend_reads_as_default_backends(self) -> None:
        self.assertEqual(_messages.backend_text("undefined"), "default backends")


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
        check = _store.Check(
            dist.HashStore(), C10D, 0, 100_000, _store.Deadline(timedelta(seconds=60)), "gloo",
            rank_info(0, 1), "{}", None, 1.0,
        )
        missing = list(range(1, 100_000, 2))
        detail = _diagnose.coordinator_timeout(check, missing, list(range(2, 100_000, 4))).detail
        self.assertLess(len(detail), 4096)
        self.assertIn("and 49984 more", detail)

    def test_many_builds_and_hosts(self) -> None:
        infos = [rank_info(r, 1 + r % 2, host=f"host-{r}") for r in range(100_000)]
        infos += [rank_info(100_000 + r, 3, min_version=3, host="h") for r in range(0, 40, 3)]
        verdict = _judge.judge(C10D, infos, "gloo")
        self.assertIsInstance(verdict, Verdict)
        self.assertLess(len(verdict.detail), 4096)


if __name__ == "__main__":
    run_tests()
