# Owner(s): ["oncall: distributed"]
"""Fault and hostile-input tests for the protocol version guardrail.

What happens to the check when the world misbehaves: the store server dies
mid-check, a rank crashes between publishing and the verdict, something writes
garbage into a rank's slot, the verdict key or beside them, two jobs share one
store server, a job restarts on the store of a failed attempt, a rank is late.
Every rank runs the real check against a real store: threads with their own store
client each where only the store protocol matters (``check_protocol_version``, the
framework helper; a thread announces another build through a patched
``local_info``), spawned processes where a rank must be able to die or to run
another build, and ``init_process_group`` where the init path matters. The keys
are derived, never discovered: ``protocol_version/<kind>/<restart>/<count>/...``,
so a test plants hostile data exactly where a rank will look.

Timeouts are short (a few seconds) where a timeout is the point, generous where
it only bounds a failure; timed assertions allow a lot of slack because the
machine is small and shared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from typing import Any
from collections.abc import Iterator, Mapping, Sequence
from unittest import mock

import torch.distributed as dist
from torch.distributed import _protocol_version as pv
from torch.distributed._protocol_version import _exchange, _messages
from torch.distributed._protocol_version._families import C10D
from torch.testing._internal.common_utils import (
    instantiate_parametrized_tests,
    parametrize,
    run_tests,
    subtest,
    TestCase,
)
from torch.testing._internal.distributed.protocol_version_utils import (
    env_init,
    GUARDRAIL_ENVS,
    MISMATCH,
    RankResult,
    RankThreads,
    read_verdict_as,
    SLACK_S,
    spawn_ranks,
    ThreadOutcome,
    versions_env,
)


HOST = "127.0.0.1"
# Exit code of a rank that killed itself on purpose (see publish_then_die).
DIED = 43


def tcp_client(port: int) -> dist.TCPStore:
    return dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=60))


def tcp_server(use_libuv: bool = True) -> dist.TCPStore:
    """A store server in this process on a free port; it does not wait for clients."""
    return dist.TCPStore(
        HOST, 0, is_master=True, wait_for_workers=False, use_libuv=use_libuv,
        timeout=timedelta(seconds=60),
    )


def ready_key(tag: str, rank: int) -> str:
    """A test-only key (outside the check's namespace) a rank sets when it starts."""
    return f"test/{tag}/ready/{rank}"


# The namespace of the first check_protocol_version call with a store object on a
# first attempt; every rank here uses a store object of its own, or a new one.
FIRST_CHECK = "check/0/0"
# init_process_group's first default group in a process, under its "default_pg" prefix.
FIRST_DEFAULT_GROUP = "c10d/0/0"
RESTART_COUNT_ENV = "TORCHELASTIC_RESTART_COUNT"
# Set by torchrun when its workers share the agent's store, the one case an attempt's store outlives it.
AGENT_STORE_ENV = "TORCHELASTIC_USE_AGENT_STORE"


def slot(rank: int, namespace: str = FIRST_CHECK) -> str:
    """Where ``rank`` publishes its payload in the check under ``namespace``."""
    return C10D.key(namespace, "rank", rank)


def check_keys(world_size: int, namespace: str = FIRST_CHECK) -> list[str]:
    """Every key a check under ``namespace`` writes."""
    return [C10D.key(namespace, k) for k in ("verdict", "read", "left")] + [
        slot(r, namespace) for r in range(world_size)
    ]


def wait_published(store: dist.Store, ranks: Sequence[int], namespace: str = FIRST_CHECK,
                   timeout_s: float = SLACK_S) -> None:
    """Block until every rank of ``ranks`` has published in the check under ``namespace``."""
    store.wait([slot(r, namespace) for r in ranks], timedelta(seconds=timeout_s))


def wait_arrived(threads: RankThreads, store: dist.Store, ranks: Sequence[int], namespace: str = FIRST_CHECK,
                 timeout_s: float = SLACK_S) -> None:
    """Poll until each of ``ranks`` has published in the check under ``namespace``
    (or a payload is in its slot already), or is done: a rank may read a verdict
    and delete its slot before a blocking wait would see it."""
    deadline = time.monotonic() + timeout_s
    while not all(r in threads.outcomes or store.check([slot(r, namespace)]) for r in ranks):
        if time.monotonic() > deadline:
            raise AssertionError(f"ranks {list(ranks)} never arrived in the check under {namespace}")
        time.sleep(0.02)


def mask_host(message: str) -> str:
    """The last line of every error names this host; the rest must not depend on it."""
    return message.replace(f"host {socket.gethostname()})", "host <host>)")


# --------------------------------------------------------------------------- #
# Ranks as threads, each with its own store client
# --------------------------------------------------------------------------- #

# Threads share this process's environment: a rank thread that runs another build
# says so here, and _local_info (patched in for the tests) announces it.
_this_thread = threading.local()
_real_local_info = _exchange.local_info


def _local_info(rank: int, family: Any, mode: str, name: str = "") -> Any:
    """``local_info``, for a rank thread that runs a build speaking only
    ``_this_thread.version``, as ``VERSION_OVERRIDE_ENV`` simulates it in a process."""
    info = _real_local_info(rank, family, mode, name)
    version = getattr(_this_thread, "version", None)
    if version is None:
        return info
    return dataclasses.replace(info, version=version, min_version=version)


def versioned_check(timeout_s: float, versions: Mapping[int, int | None]) -> Any:
    """A rank thread's body: the real check, on a build that speaks only
    ``versions[rank]`` (this build where ``None`` or absent)."""

    def body(store: dist.Store, rank: int, world_size: int) -> int:
        _this_thread.version = versions.get(rank)
        return pv.check_protocol_version(store, rank, world_size, timedelta(seconds=timeout_s))

    return body


def run_threads(
    port: int, ranks: Sequence[int], world_size: int, timeout_s: float, prefix: str | None = None
) -> dict[int, ThreadOutcome]:
    def store() -> dist.Store:
        return tcp_client(port) if prefix is None else dist.PrefixStore(prefix, tcp_client(port))

    return RankThreads(world_size, timeout_s).start({r: store() for r in ranks}).join()


# --------------------------------------------------------------------------- #
# A store server that can be killed: a separate process, like torchrun's agent
# --------------------------------------------------------------------------- #

_SERVER_SCRIPT = """
import sys
import torch.distributed as dist
store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
print(store.port, flush=True)
sys.stdin.read()  # serve until killed, or until the test process goes away
"""


@contextlib.contextmanager
def store_server_process() -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        yield proc, int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


def spawn_in_background(*args: Any, **kwargs: Any) -> tuple[threading.Thread, list[RankResult]]:
    """``spawn_ranks`` in a thread, for a test that acts while the ranks run."""
    results: list[RankResult] = []
    thread = threading.Thread(target=lambda: results.extend(spawn_ranks(*args, **kwargs)))
    thread.start()
    return thread, results


# --------------------------------------------------------------------------- #
# Functions run inside spawned ranks (module level, so spawn can pickle them)
# --------------------------------------------------------------------------- #


def publish_then_die(rank: int, world_size: int, port: int, timeout_s: float) -> None:
    """Run the real check as ``rank`` and kill this process the moment its own
    payload is in the store: a crash after publishing, before any verdict."""
    store, observer = tcp_client(port), tcp_client(port)
    observer.set(ready_key("die", rank), "1")
    threading.Thread(
        target=pv.check_protocol_version,
        args=(store, rank, world_size, timedelta(seconds=timeout_s)),
        daemon=True,
    ).start()
    wait_published(observer, [rank], timeout_s=timeout_s)
    os._exit(DIED)


def check_after_ready(rank: int, world_size: int, port: int, timeout_s: float, tag: str) -> int:
    """The real check, after telling the test (through a ready key) that it starts."""
    store = tcp_client(port)
    store.set(ready_key(tag, rank), "1")
    return pv.check_protocol_version(store, rank, world_size, timedelta(seconds=timeout_s))


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #


class GuardrailEnvTestCase(TestCase):
    """Rank threads read this process's environment: keep the developer's out,
    and let a rank thread announce another build (see :func:`versioned_check`)."""

    def setUp(self) -> None:
        super().setUp()
        self.enterContext(mock.patch.dict(os.environ))
        for name in (*GUARDRAIL_ENVS, RESTART_COUNT_ENV, AGENT_STORE_ENV):
            os.environ.pop(name, None)
        self.enterContext(mock.patch.object(_exchange, "local_info", _local_info))

    def assertAllFail(self, outcomes: Mapping[int, ThreadOutcome], *fragments: str) -> None:
        for rank, outcome in outcomes.items():
            self.assertIsNotNone(outcome.error, f"rank {rank} passed: {outcome.value}")
            for fragment in fragments:
                self.assertIn(fragment, outcome.error)

    def assertAllPass(self, outcomes: Mapping[int, ThreadOutcome], ranks: Sequence[int]) -> None:
        self.assertEqual(sorted(outcomes), sorted(ranks))
        for rank, outcome in outcomes.items():
            self.assertIsNone(outcome.error, f"rank {rank} failed")
            self.assertEqual(outcome.value, pv.PROTOCOL_VERSION)

    def assertLeftNothing(self, store: dist.Store, world_size: int, namespace: str = FIRST_CHECK) -> None:
        """Every rank read the verdict: the check removed every key it wrote."""
        for key in check_keys(world_size, namespace):
            self.assertFalse(store.check([key]), key)


class TestStoreServerDies(GuardrailEnvTestCase):
    TIMEOUT_S = 30.0

    @parametrize(
        "present,waits",
        [
            # Rank 2 never comes: rank 0 collects, rank 1 waits for the verdict.
            ((0, 1), {0: "collecting payloads", 1: "waiting for the verdict"}),
            # Rank 0 never comes: the others wait for its verdict.
            ((1, 2), {1: "waiting for the verdict", 2: "waiting for the verdict"}),
        ],
        name_fn=lambda present, waits: "while_rank_0_" + ("collects" if 0 in present else "is_awaited"),
    )
    def test_every_rank_gets_a_store_error_with_context(
        self, present: tuple[int, ...], waits: dict[int, str]
    ) -> None:
        """Killing the server mid-check fails every rank at once, not at its
        timeout, with the check's context and the store's own reason. A rank's
        next store call after publishing is its blocking wait: once every payload
        is in, every rank is in (or entering) it."""
        with store_server_process() as (server, port):
            observer = tcp_client(port)
            threads = RankThreads(3, self.TIMEOUT_S).start({r: tcp_client(port) for r in present})
            wait_published(observer, present)
            server.kill()
            killed = time.monotonic()
            outcomes = threads.join()
        for rank, what in waits.items():
            error = outcomes[rank].error
            self.assertIsNotNone(error)
            self.assertIsInstance(outcomes[rank].exception, dist.DistError)  # the store's own type
            self.assertIn(
                f"protocol version check on rank {rank}: the store failed while {what}: ",
                error,
            )
            # The store's own reason: a blocked call sees the socket closed, a poll a reset.
            self.assertRegex(error, "Connection was likely closed|Connection reset by peer")
            self.assertLess(outcomes[rank].finished - killed, self.TIMEOUT_S / 2)

    def test_init_process_group_on_an_agent_store_that_dies(self) -> None:
        """torchrun's layout: the store lives in the agent, every rank is a client.
        The agent dying while rank 0 collects fails both ranks' init at once."""
        with store_server_process() as (server, port):
            observer = dist.PrefixStore("default_pg", tcp_client(port))
            job, results = spawn_in_background(
                env_init, 3, (port, "gloo", self.TIMEOUT_S), ranks=[0, 1],
                common_env={"TORCHELASTIC_USE_AGENT_STORE": "True"}, timeout=self.TIMEOUT_S + 60,
            )
            wait_published(observer, [0, 1], FIRST_DEFAULT_GROUP, timeout_s=60)
            server.kill()
            killed = time.time()
            job.join()
        self.assertEqual([r.rank for r in results], [0, 1])
        for result, what in zip(results, ["collecting payloads", "waiting for the verdict"]):
            # The store's own error type, which elastic agents catch, with the check's context.
            self.assertEqual(result.error_type, "DistNetworkError", result.error)
            self.assertIn(
                f"protocol version check on rank {result.rank}: the store failed while {what}",
                result.error,
            )
            self.assertLess(result.finished - killed, self.TIMEOUT_S / 2)


class TestRankCrashes(GuardrailEnvTestCase):
    def test_coordinator_dies_after_publishing(self) -> None:
        """Rank 0 publishes and dies: the others time out with a message that
        names rank 0 and says how far it got."""
        server = tcp_server()
        (died,) = spawn_ranks(publish_then_die, 3, (server.port, 60.0), ranks=[0], timeout=90)
        self.assertEqual(died.exitcode, DIED, died.error)
        outcomes = run_threads(server.port, [1, 2], 3, timeout_s=3)
        self.assertAllFail(outcomes, "every rank has published its version, but rank 0 has not delivered the verdict")
        self.assertTrue(all(isinstance(o.exception, dist.DistStoreError) for o in outcomes.values()), outcomes)
        self.assertExpectedInline(
            mask_host(outcomes[1].error),
            """\
torch.distributed protocol version check timed out after 3s (backend unknown): on rank 1: every rank has published its version, but rank 0 has not delivered the verdict.
This rank (rank 1, host <host>) runs protocol version 1.""",
        )

    @parametrize("version", [1, 2])
    def test_rank_dies_after_publishing(self, version: int) -> None:
        """A rank other than 0 that publishes and then dies still counts: the
        verdict forms from its payload. Matching, the check passes (the dead rank
        shows up later, in backend setup); mismatching, every live rank raises the
        mismatch. Rank 0 waits for the dead rank to read the verdict up to its
        timeout, then goes on with it."""
        server = tcp_server()
        timeout_s = 5.0
        (died,) = spawn_ranks(
            publish_then_die, 3, (server.port, 60.0), ranks=[2], rank_env=versions_env({2: version}), timeout=90,
        )
        self.assertEqual(died.exitcode, DIED, died.error)
        started = time.monotonic()
        outcomes = run_threads(server.port, [0, 1], 3, timeout_s)
        if version == pv.PROTOCOL_VERSION:
            self.assertAllPass(outcomes, [0, 1])
            return
        self.assertAllFail(outcomes, MISMATCH, "protocol version 2: rank 2", "upgrade ranks 0-1")
        self.assertTrue(all(isinstance(o.exception, pv.ProtocolVersionError) for o in outcomes.values()), outcomes)
        self.assertLess(max(o.finished for o in outcomes.values()) - started, timeout_s + SLACK_S)


# A payload whose unpickling creates a file: proof that the check never unpickles.
class _CreatesFileWhenUnpickled:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def creates_file_when_evaluated(path: str) -> bytes:
    return f"__import__('pathlib').Path({path!r}).touch()".encode()


def creates_file_when_unpickled(path: str) -> bytes:
    return pickle.dumps(_CreatesFileWhenUnpickled(path))


# What a hostile rank writes, and the reason the check must give for it.
MALFORMED = {
    "deeply nested": (b"[" * 30_000 + b"]" * 30_000, "JSON nested too deeply"),
    "a_list": (b"[1, 1]", "expected a JSON object, got list"),
    "no_version": (b'{"min_protocol_version": 1}', "'protocol_version' must be an integer from 0 to 2**63 - 1, got None"),
    "string": (b'{"protocol_version": "1"}', "'protocol_version' must be an integer from 0 to 2**63 - 1, got '1'"),
    "float": (b'{"protocol_version": 1.0}', "'protocol_version' must be an integer from 0 to 2**63 - 1, got 1.0"),
    "bool": (b'{"protocol_version": true}', "'protocol_version' must be an integer from 0 to 2**63 - 1, got True"),
    "negative": (b'{"protocol_version": -1}', "'protocol_version' must be an integer from 0 to 2**63 - 1, got -1"),
    "min_above": (
        b'{"protocol_version": 1, "min_protocol_version": 2}',
        "minimum version 2 is above its version 1",
    ),
}
assert len(MALFORMED) <= _messages.MAX_LISTED  # one verdict lists them all


class TestHostilePayloads(GuardrailEnvTestCase):
    # Rank 0 holds on to its verdict until every rank that published read it; a
    # hostile writer never does, so keep the timeout short.
    TIMEOUT_S = 5.0

    def judge_with_hostile_ranks(self, payloads: Sequence[bytes]) -> dict[int, ThreadOutcome]:
        """Ranks 0 and 1 run the real check; ranks 2, 3, ... have ``payloads``
        in their slots, where a real rank would publish its own."""
        server = tcp_server()
        for rank, payload in enumerate(payloads, start=2):
            server.set(slot(rank), payload)
        return run_threads(server.port, [0, 1], 2 + len(payloads), self.TIMEOUT_S)

    def test_a_payload_planted_before_the_check_is_refused(self) -> None:
        """A fresh store object starts at the first namespace: garbage planted in
        rank 1's slot there fails rank 0's check as invalid, naming rank 1."""
        store = dist.HashStore()
        store.set(slot(1), b"\x80\x04K\x01.")  # a pickle
        outcome = RankThreads(2, 2.0).start({0: store}).join()[0]
        self.assertIsInstance(outcome.exception, pv.ProtocolVersionError)
        self.assertIn("1 rank published an invalid protocol version payload", outcome.error)
        self.assertIn("\n  rank 1: not valid JSON", outcome.error)

    def test_malformed_payloads_are_named_by_rank_on_every_rank(self) -> None:
        outcomes = self.judge_with_hostile_ranks([payload for payload, _ in MALFORMED.values()])
        expected = [f"  rank {rank}: {reason}\n" for rank, (_, reason) in enumerate(MALFORMED.values(), 2)]
        self.assertAllFail(outcomes, f"{len(MALFORMED)} ranks published an invalid protocol version payload", *expected)
        self.assertTrue(all(isinstance(o.exception, pv.ProtocolVersionError) for o in outcomes.values()), outcomes)

    def test_code_and_oversized_payloads_are_never_run(self) -> None:
        """A pickle that would create a file when unpickled, a Python expression that
        would when evaluated and a 1 MiB blob: each is refused with a reason, and
        the marker files do not exist."""
        with tempfile.TemporaryDirectory() as tmp:
            markers = [os.path.join(tmp, name) for name in ("unpickled", "evaluated")]
            # The probes work: a consumer that unpickled or evaluated would create a marker.
            controls = [os.path.join(tmp, name) for name in ("control-unpickled", "control-evaluated")]
            pickle.loads(creates_file_when_unpickled(controls[0])).close()
            eval(creates_file_when_evaluated(controls[1]))
            self.assertTrue(all(os.path.exists(path) for path in controls))
            outcomes = self.judge_with_hostile_ranks(
                [
                    creates_file_when_unpickled(markers[0]),
                    creates_file_when_evaluated(markers[1]),
                    b"x" * 2**20,
                    b"protocol_version=1",
                ]
            )
            self.assertFalse(os.path.exists(markers[0]))
            self.assertFalse(os.path.exists(markers[1]))
        self.assertAllFail(outcomes, "rank 2: not valid JSON", "rank 3: not valid JSON")
        self.assertExpectedInline(
            mask_host(outcomes[0].error),
            """\
torch.distributed protocol version check failed (backend unknown): 4 ranks published an invalid protocol version payload or setting, so this job cannot be judged safe:
  rank 2: not valid JSON ('utf-8' codec can't decode byte 0x80 in position 0: invalid start byte)
  rank 3: not valid JSON (Expecting value: line 1 column 1 (char 0))
  rank 4: 1048576 bytes, over the 65536-byte limit
  rank 5: not valid JSON (Expecting value: line 1 column 1 (char 0))
Where a line names an invalid setting, fix it on that host; otherwise something other than this check wrote to its keys in the store, or a build that speaks another payload format joined the job.
This rank (rank 0, host <host>) runs protocol version 1.""",
        )

    def test_payload_from_a_future_build_is_accepted(self) -> None:
        """A later build may add fields and speak a range: what this build
        understands is enough to agree on the version both speak. That build
        follows the protocol: it reads the verdict and counts itself out."""
        future = {
            "protocol_version": 3,
            "min_protocol_version": 1,
            "torch_version": "9.9.9",
            "hostname": "node-from-the-future",
            "pid": 1,
            "token": "0" * 16,
            "transport": {"name": "zero-copy", "window": [1, 2]},
            "signed_by": None,
        }
        server = tcp_server()
        server.set(slot(2), json.dumps(future))
        threads = RankThreads(3, 30.0).start({r: tcp_client(server.port) for r in (0, 1)})
        verdict = read_verdict_as(server, [2])
        self.assertAllPass(threads.join(), [0, 1])
        self.assertEqual(json.loads(verdict)["negotiated"], 1)
        self.assertLeftNothing(server, 3)

    def test_foreign_keys_in_the_namespace_are_ignored_and_kept(self) -> None:
        """Keys the check never writes, beside its own (what an older build of the
        check wrote, a slot past the world size, another attempt's slot, an
        unknown name), change nothing: the check passes on every rank, removes
        its own keys and leaves the others where they were."""
        store = dist.HashStore()
        foreign = {
            C10D.key("current"): b"1; rm -rf /",
            slot(99): b"garbage",
            slot(1, "check/0/1"): b"garbage",
            C10D.key(FIRST_CHECK, "notes"): b"\x00" * 1000,
        }
        for key, value in foreign.items():
            store.set(key, value)
        threads = RankThreads(3, timeout_s=30.0).start(dict.fromkeys(range(3), store))
        self.assertAllPass(threads.join(), [0, 1, 2])
        self.assertLess(max(o.finished for o in threads.outcomes.values()) - threads.released_wall, 10.0)
        self.assertLeftNothing(store, 3)
        self.assertEqual({key: store.get(key) for key in foreign}, foreign)
        self.assertEqual(store.num_keys(), len(foreign))

    @parametrize(
        "value,reason",
        [
            subtest((b'["ok", 1]', "unreadable verdict"), name="not_an_object"),
            subtest((b"{" * 40_000, "unreadable verdict"), name="deeply_nested"),
            subtest((b"x" * 2**20, "unreadable verdict (1048576 bytes, over the 65536-byte limit)"), name="huge"),
            subtest((b'{"status": "fine", "detail": "", "negotiated": 1}', "unknown status 'fine'"),
                    name="unknown_status"),
            subtest((b'{"status": "ok", "detail": "", "negotiated": "1"}', "without a negotiated version"),
                    name="ok_without_a_version"),
            subtest((b'{"status": "ok", "detail": "", "negotiated": 1, "without": "1"}',
                     "invalid 'without' or 'readers'"), name="bad_without"),
            subtest((b'{"status": "ok", "detail": "", "negotiated": 1, "token": "../../x"}',
                     "invalid token '../../x'"), name="bad_token"),
        ],
    )
    def test_hostile_verdicts_are_refused(self, value: bytes, reason: str) -> None:
        """What the other ranks read from rank 0 is parsed as strictly as a
        payload, and the error names the key."""
        store = dist.HashStore()
        store.set(C10D.key(FIRST_CHECK, "verdict"), value)
        outcomes = RankThreads(2, self.TIMEOUT_S).start({1: store}).join()
        self.assertAllFail(outcomes, f"the key protocol_version/{FIRST_CHECK}/verdict holds", reason)
        self.assertIsInstance(outcomes[1].exception, pv.ProtocolVersionError)


class TestSharedStoreServer(GuardrailEnvTestCase):
    def test_two_jobs_on_one_server_get_their_own_verdicts(self) -> None:
        """Job "a" matches; job "b" mixes builds (its rank 1 runs version 2). Both
        use one server through their own PrefixStore, and both coordinators
        collect at the same time: neither job's payloads or verdict leak."""
        server = tcp_server()
        jobs = {"a": RankThreads(2, 30.0), "b": RankThreads(2, 30.0, versioned_check(30.0, {1: 2}))}
        for name in "ab":
            jobs[name].start({0: dist.PrefixStore(name, tcp_client(server.port))})
        for name in "ab":  # both coordinators are collecting
            wait_published(dist.PrefixStore(name, server), [0])
        for name in "ba":
            jobs[name].start({1: dist.PrefixStore(name, tcp_client(server.port))})
        self.assertAllPass(jobs["a"].join(), [0, 1])
        outcomes = jobs["b"].join()
        self.assertAllFail(
            outcomes, MISMATCH, "the 2 ranks of this job", "protocol version 1: rank 0 on host",
            "protocol version 2: rank 1 on host",
        )
        for name in "ab":
            self.assertLeftNothing(dist.PrefixStore(name, server), 2)


ATTEMPT_1 = ["passed", "mixed_builds", "rank_2_never_came", "rank_0_never_came", "rank_0_died"]
# How attempt 1 left the store in the namespace it used, and so how attempt 2 fares there.
LEAVES_KEYS = {"rank_2_never_came", "rank_0_died"}
# Where attempt 2 checks: torchrun's restart count, a fresh PrefixStore, or attempt 1's namespace.
FRESH = ["restart_count", "prefix"]


class TestRestartOnTheSameStore(GuardrailEnvTestCase):
    """An elastic restart on the same store: fresh processes (here: new store
    objects) of attempt 2 are judged on their own ranks only, however attempt 1
    ended, wherever they check under a namespace of their own (torchrun's restart
    count, or a fresh prefix). Without one, attempt 2 either finds nothing left
    (attempt 1's ranks all read their verdict, or rank 0 never came) or gets a
    clear account telling it to use a fresh prefix; never a mismatch."""

    def run_attempt_1(self, how: str, port: int) -> None:
        """Leave the store as attempt 1 (world size 3) left it, and check it failed as intended."""
        if how == "passed":
            self.assertAllPass(run_threads(port, [0, 1, 2], 3, timeout_s=30), [0, 1, 2])
        elif how == "mixed_builds":
            threads = RankThreads(3, 30.0, versioned_check(30.0, {2: 2}))
            self.assertAllFail(threads.start({r: tcp_client(port) for r in (0, 1, 2)}).join(), MISMATCH)
        elif how == "rank_2_never_came":
            self.assertAllFail(run_threads(port, [0, 1], 3, timeout_s=2), "rank 2 never published")
        elif how == "rank_0_never_came":
            self.assertAllFail(run_threads(port, [1, 2], 3, timeout_s=2), "rank 0 never published")
        else:  # rank 0 published and died; rank 1 waited in vain; rank 2 never came
            (died,) = spawn_ranks(publish_then_die, 3, (port, 60.0), ranks=[0], timeout=90)
            self.assertEqual(died.exitcode, DIED, died.error)
            self.assertAllFail(run_threads(port, [1], 3, timeout_s=2), "rank 0 has not delivered the verdict")

    def run_attempt_2(self, port: int, rank_0: str, prefix: str | None = None,
                      namespace: str = FIRST_CHECK) -> dict[int, ThreadOutcome]:
        """With ``rank_0="last"`` the other ranks of attempt 2 arrive first."""
        def store() -> dist.Store:
            return tcp_client(port) if prefix is None else dist.PrefixStore(prefix, tcp_client(port))

        first, then = ([0], [1, 2]) if rank_0 == "first" else ([1, 2], [0])
        threads = RankThreads(3, timeout_s=30).start({r: store() for r in first})
        observer = tcp_client(port) if prefix is None else dist.PrefixStore(prefix, tcp_client(port))
        wait_arrived(threads, observer, first, namespace)
        return threads.start({r: store() for r in then}).join()

    def assertRestartPasses(self, attempt_1: str, rank_0: str, fresh: str, use_libuv: bool = True) -> None:
        server = tcp_server(use_libuv)
        self.run_attempt_1(attempt_1, server.port)
        if fresh == "restart_count":
            with mock.patch.dict(os.environ, {RESTART_COUNT_ENV: "1", AGENT_STORE_ENV: "True"}):  # as torchrun sets them
                outcomes = self.run_attempt_2(server.port, rank_0, namespace="check/1/0")
            self.assertLeftNothing(server, 3, "check/1/0")
        else:
            outcomes = self.run_attempt_2(server.port, rank_0, prefix="attempt-2")
            self.assertLeftNothing(dist.PrefixStore("attempt-2", server), 3)
        self.assertAllPass(outcomes, [0, 1, 2])

    @parametrize("attempt_1", ATTEMPT_1)
    @parametrize("rank_0", ["first", "last"])
    @parametrize("fresh", FRESH)
    def test_restart_passes(self, attempt_1: str, rank_0: str, fresh: str) -> None:
        self.assertRestartPasses(attempt_1, rank_0, fresh)

    @parametrize("attempt_1", ATTEMPT_1)
    @parametrize("rank_0", ["first", "last"])
    def test_restart_in_the_same_namespace_passes_or_says_to_use_a_fresh_prefix(
        self, attempt_1: str, rank_0: str
    ) -> None:
        """Attempt 2 reuses attempt 1's namespace (same store, no restart count,
        no prefix). A check whose every rank read the verdict left nothing:
        attempt 2 passes; so does one whose rank 0 never came, where attempt 2's
        ranks overwrite their payloads before rank 0 comes. Otherwise attempt 2
        fails with a DistStoreError, never a mismatch: rank 0 finds its own slot
        taken; a rank that read attempt 1's verdict first gets that account, or
        attempt 1's timeout, or the same advice; a rank whose payload the verdict
        did not judge says the namespace was used twice. Only a rank 0 that judged
        attempt 1's payloads (of its own build) passes: it cannot tell them apart."""
        server = tcp_server()
        self.run_attempt_1(attempt_1, server.port)
        outcomes = self.run_attempt_2(server.port, rank_0)
        # Ranks 1-2 of an attempt without rank 0 leave their payloads, which a rank 0 that comes first judges.
        judged_stale = attempt_1 == "rank_0_never_came" and rank_0 == "first"
        if attempt_1 not in LEAVES_KEYS and not judged_stale:
            self.assertAllPass(outcomes, [0, 1, 2])
            return
        self.assertEqual(sorted(outcomes), [0, 1, 2])
        for rank, outcome in outcomes.items():
            if judged_stale and rank == 0:
                self.assertEqual(outcome.value, pv.PROTOCOL_VERSION, outcome.error)
                continue
            self.assertIsInstance(outcome.exception, dist.DistStoreError, f"rank {rank}: {outcome.error}")
            self.assertRegex(outcome.error, "prefix per attempt|timed out after 2s")
        if judged_stale:
            return
        self.assertIn(
            f"the store already holds an earlier check under protocol_version/{FIRST_CHECK} (an earlier attempt that "
            "timed out or was killed); this attempt cannot be told apart from it. Pass a fresh store or a fresh "
            "PrefixStore prefix per attempt.", outcomes[0].error,
        )

    def test_restart_after_a_dead_coordinator_on_the_legacy_server(self) -> None:
        """Attempt 1's rank 0 died after publishing; attempt 2 (its restart count
        set) checks beside attempt 1's leftovers on the legacy (non-libuv)
        TCPStore server too."""
        self.assertRestartPasses("rank_0_died", "last", "restart_count", use_libuv=False)

    def test_restart_with_more_ranks(self) -> None:
        """Attempt 1 passed with 2 ranks and left nothing; attempt 2 has 3 in the
        same namespace and its new rank 2 comes first: it must wait for attempt
        2's verdict, not find attempt 1's."""
        server = tcp_server()
        self.assertAllPass(run_threads(server.port, [0, 1], 2, timeout_s=30), [0, 1])
        self.assertLeftNothing(server, 2)
        threads = RankThreads(3, timeout_s=30).start({2: tcp_client(server.port)})
        wait_published(server, [2])
        threads.start({r: tcp_client(server.port) for r in (0, 1)})
        self.assertAllPass(threads.join(), [0, 1, 2])

    def test_restart_is_judged_anew(self) -> None:
        """Attempt 1 passed; attempt 2 brings a rank with another build and its rank
        0 comes last: attempt 1's verdict must not let it through."""
        server = tcp_server()
        self.run_attempt_1("passed", server.port)
        other_build, results = spawn_in_background(
            check_after_ready, 3, (server.port, 60.0, "attempt2"), ranks=[2],
            rank_env=versions_env({2: 2}), timeout=120,
        )
        threads = RankThreads(3, timeout_s=30).start({1: tcp_client(server.port)})
        wait_published(server, [1, 2], timeout_s=60)  # ranks 1 and 2 are in before rank 0
        threads.start({0: tcp_client(server.port)})
        other_build.join()
        self.assertAllFail(threads.join(), MISMATCH, "protocol version 2: rank 2")
        self.assertEqual(results[0].error_type, "ProtocolVersionError", results[0].error)
        self.assertIn("protocol version 2: rank 2", results[0].error)


class TestLateRank(GuardrailEnvTestCase):
    @parametrize("late", [0, 2])
    def test_rank_late_within_the_timeout_passes(self, late: int) -> None:
        server = tcp_server()
        threads = RankThreads(3, timeout_s=20)
        threads.start({r: tcp_client(server.port) for r in (0, 1, 2) if r != late})
        time.sleep(3.0)  # the lateness is the scenario
        threads.start({late: tcp_client(server.port)})
        self.assertAllPass(threads.join(), [0, 1, 2])
        self.assertLeftNothing(server, 3)


class TestStoreKinds(GuardrailEnvTestCase):
    """The core exchange on every kind of store: a matching check, then a second
    one with the same store objects (the next namespace) where rank 1 runs
    protocol version 2; each leaves nothing behind. Ranks are threads with a
    client each (a HashStore lives in one process, so they share it)."""

    def open_stores(self, kind: str, tmp: str) -> tuple[dict[int, dist.Store], dist.Store]:
        """Each rank's view of one store, and an observer's."""
        if kind == "HashStore":
            store = dist.HashStore()
            return {0: store, 1: store}, store
        if kind == "FileStore":
            path = os.path.join(tmp, "store")
            return {r: dist.FileStore(path, -1) for r in (0, 1)}, dist.FileStore(path, -1)
        libuv = kind != "TCPStore-no-libuv"
        server = tcp_server(use_libuv=libuv)
        self.assertEqual(server.libuvBackend, libuv)
        if kind == "PrefixStore":
            return {r: dist.PrefixStore("job", tcp_client(server.port)) for r in (0, 1)}, dist.PrefixStore("job", server)
        return {r: tcp_client(server.port) for r in (0, 1)}, server

    @parametrize("kind", ["TCPStore", "TCPStore-no-libuv", "FileStore", "PrefixStore", "HashStore"])
    def test_match_then_mismatch(self, kind: str) -> None:
        runs = []
        with tempfile.TemporaryDirectory() as tmp:
            stores, observer = self.open_stores(kind, tmp)
            for count, versions in enumerate(({}, {1: 2})):
                threads = RankThreads(2, 30.0, versioned_check(30.0, versions))
                runs.append(threads.start(stores).join())
                self.assertLeftNothing(observer, 2, f"check/0/{count}")
        self.assertAllPass(runs[0], [0, 1])
        self.assertAllFail(runs[1], MISMATCH, "protocol version 2: rank 1")
        for rank, outcome in runs[1].items():
            self.assertIn(f"This rank (rank {rank},", outcome.error)


instantiate_parametrized_tests(TestStoreServerDies)
instantiate_parametrized_tests(TestRankCrashes)
instantiate_parametrized_tests(TestHostilePayloads)
instantiate_parametrized_tests(TestRestartOnTheSameStore)
instantiate_parametrized_tests(TestLateRank)
instantiate_parametrized_tests(TestStoreKinds)


if __name__ == "__main__":
    run_tests()
