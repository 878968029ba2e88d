"""Helpers shared by the protocol version tests, the demo and the benchmarks.

Upstream keeps distributed test helpers here, so that tests, tools and
benchmarks all import them the same way. Two ways to run the ranks of a job:

* :func:`spawn_ranks`: every rank a real process, forked from a server that
  imported torch once (or, with ``fresh``, a fresh interpreter, like a real
  node), with the test's environment, so the guardrail's variables, the hook and
  gloo are exercised as in a job. A rank's outcome comes back through a queue as
  plain data; the parent never waits past its own deadline and kills what is left.
* :class:`RankThreads`: ranks as threads of this process, each with the store it
  is given; for the store exchange alone, and for many simulated ranks.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from datetime import timedelta
from typing import Any
from collections.abc import Callable, Mapping, Sequence

import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed import _protocol_version as pv
from torch.distributed._protocol_version import (
    AGENTS_VERDICT_ENV,
    CHECK_MODE_ENV,
    MIN_VERSION_OVERRIDE_ENV,
    ROUND_ENV,
    RPC_MIN_VERSION_OVERRIDE_ENV,
    RPC_VERSION_OVERRIDE_ENV,
    VERSION_OVERRIDE_ENV,
)
from torch.distributed._protocol_version._families import C10D, Family
from torch.distributed._protocol_version._payload import RankInfo


# The guardrail's own variables: unset in every rank unless a test sets them.
GUARDRAIL_ENVS = (
    VERSION_OVERRIDE_ENV,
    MIN_VERSION_OVERRIDE_ENV,
    CHECK_MODE_ENV,
    RPC_VERSION_OVERRIDE_ENV,
    RPC_MIN_VERSION_OVERRIDE_ENV,
    ROUND_ENV,
    AGENTS_VERDICT_ENV,
)
# The checkout this file belongs to (it is linked into the installed torch).
REPO_ROOT = Path(__file__).resolve().parents[4]
# The same torch without the guardrail, the baseline every off-the-happy-path test
# compares against: ``.venv-stock`` (``make test`` builds it beside ``.venv``), or
# ``PV_STOCK_PYTHON``'s where the tests run on another release (``make test-2.14``).
STOCK_PYTHON = Path(os.environ.get("PV_STOCK_PYTHON") or REPO_ROOT / ".venv-stock" / "bin" / "python")
NO_STOCK_REASON = f"no stock torch environment at {STOCK_PYTHON} to compare with"
# The other supported release with the hooks: torch 2.14.1, which ``make test-long`` builds.
NEXT_VENV = REPO_ROOT / ".venv-2.14"
# torchrun tests: the local rank that runs another build.
ODD_RANK_ENV = "PV_TEST_ODD_LOCAL_RANK"
# What every mismatch message says (the first line names torch.distributed too).
MISMATCH = "protocol version mismatch"
# What RankInfo.to_payload wrote before build identity (commit 43e4c4c), byte for
# byte: the payload of an older build of the check, which acknowledges only a
# failing verdict.
OLD_PAYLOAD = (
    b'{"family": "c10d", "hostname": "node-old", "min_protocol_version": 1, "mode": "error", '
    b'"overrides": [], "pid": 4242, "protocol_version": 1, "schema": 1, '
    b'"token": "00112233aabbccdd", "torch_version": "2.13.0+cpu"}'
)
# Slack for joining rank threads and for timed assertions: the reference box has
# 2 cores, shared with other test runs.
SLACK_S = 15.0


class WarningCollector(logging.Handler):
    """Collects the messages of the WARNING records it handles (attach it to a logger)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass
class RankResult:
    """What one spawned rank did: its return value, or the exception it raised."""

    rank: int
    value: Any = None
    error_type: str | None = None
    error: str | None = None
    started: float = 0.0  # time.time() when the rank entered its function
    finished: float = 0.0  # time.time() when it returned or raised
    exitcode: int | None = None

    @property
    def ok(self) -> bool:
        return self.error_type is None and self.exitcode == 0


def _child(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    env: Mapping[str, str],
    args: tuple[Any, ...],
    results: Any,
) -> None:
    os.environ.clear()  # a forked rank starts with the server's environment: take the test's
    os.environ.update(env)
    result = RankResult(rank, started=time.time())
    try:
        result.value = fn(rank, world_size, *args)
    except BaseException as e:  # noqa: B036 - report everything to the parent
        result.error_type = type(e).__name__
        result.error = str(e) or traceback.format_exc()
    result.finished = time.time()
    results.put(result)


def spawn_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple[Any, ...] = (),
    rank_env: Mapping[int, Mapping[str, str | None]] | None = None,
    common_env: Mapping[str, str | None] | None = None,
    timeout: float = 120.0,
    ranks: Sequence[int] | None = None,
    fresh: bool = False,
) -> list[RankResult]:
    """Run ``fn(rank, world_size, *args)`` in one process per rank.

    For ranks that start apart, or in environments of their own (late, missing
    and foreign ranks, one rank's override, a rank on stock torch): ranks that
    start together use upstream's ``MultiProcessTestCase``.
    The processes fork from a server that imported torch once (a fresh interpreter
    spends about 2 s of CPU importing it, most of what a test costs on a small
    machine), and each takes the test's environment as it is at the call. What
    torch reads at import (``TORCH_DISTRIBUTED_DEBUG``, ``TORCH_CPP_LOG_LEVEL``)
    is then the server's: ``fresh`` spawns fresh interpreters instead, for ranks
    whose start-up differs (those variables, a ``sitecustomize`` on ``PYTHONPATH``).
    ``rank_env`` sets (or, with ``None``, unsets) variables for single ranks on top
    of ``common_env``; the guardrail's own variables are unset unless given, so a
    developer's shell cannot leak into a test. ``ranks`` starts only some ranks
    (to simulate one that never arrives). Results come back ordered by rank; a rank
    that died without reporting has only its ``exitcode``.
    """
    ctx = mp.get_context("spawn" if fresh else "forkserver")
    if not fresh:
        ctx.set_forkserver_preload(["torch.distributed", __name__])
    results = ctx.Queue()
    started = list(range(world_size)) if ranks is None else list(ranks)
    procs = {}
    for rank in started:
        overrides = dict.fromkeys(GUARDRAIL_ENVS) | dict(common_env or {}) | dict((rank_env or {}).get(rank, {}))
        env = {k: v for k, v in (dict(os.environ) | overrides).items() if v is not None}
        proc = ctx.Process(target=_child, args=(fn, rank, world_size, env, args, results))
        proc.start()
        procs[rank] = proc
    deadline = time.monotonic() + timeout
    collected: dict[int, RankResult] = {}
    try:
        while len(collected) < len(procs) and time.monotonic() < deadline:
            try:
                result = results.get(timeout=0.2)
                collected[result.rank] = result
            except queue.Empty:
                if not any(p.is_alive() for p in procs.values()) and results.empty():
                    break
    finally:
        for proc in procs.values():
            proc.join(max(deadline - time.monotonic(), 0.1))
            if proc.is_alive():
                proc.kill()
                proc.join()
    out = []
    for rank, proc in sorted(procs.items()):
        result = collected.get(rank, RankResult(rank, error_type="NoReport", error="no report"))
        result.exitcode = proc.exitcode
        out.append(result)
    return out


TRACELESS_BACKEND = "pvtraceless"


def _gloo_under_its_own_prefix(store: dist.Store, rank: int, size: int, timeout: timedelta) -> Any:
    return dist.ProcessGroupGloo(dist.PrefixStore("traceless", store), rank, size, timeout)


def register_traceless_backend() -> str:
    """Register, in this process, a plugin backend that stands in for NCCL: gloo
    under a prefix of its own, so it leaves no key where the check looks for
    gloo's (NCCL leaves none at init). Returns its name."""
    if TRACELESS_BACKEND not in dist.Backend.backend_list:
        dist.Backend.register_backend(TRACELESS_BACKEND, _gloo_under_its_own_prefix, devices=["cpu"])
    return TRACELESS_BACKEND


def env_init(
    rank: int,
    world_size: int,
    port: int,
    backend: str | None = "gloo",
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """``init_process_group`` through ``env://``, one all_reduce, destroy.

    Returns the all_reduce result and the negotiated group version.
    """
    import torch
    from torch.distributed._protocol_version import get_group_protocol_version

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    try:
        return all_reduce_and_version(torch, get_group_protocol_version)
    finally:
        dist.destroy_process_group()


def all_reduce_and_version(torch: Any, get_version: Callable[[], int]) -> dict[str, Any]:
    """One all_reduce of ones, and the group's negotiated version (``None`` when
    none was negotiated, e.g. with the check off)."""
    tensor = torch.ones(1)
    dist.all_reduce(tensor)
    try:
        version: int | None = get_version()
    except RuntimeError:
        version = None
    return {"sum": tensor.item(), "group_version": version}


def versions_env(versions: Mapping[int, int]) -> dict[int, dict[str, str | None]]:
    """``{rank: version}`` -> ``rank_env`` that overrides those ranks' versions."""
    return {rank: {VERSION_OVERRIDE_ENV: str(version)} for rank, version in versions.items()}


def rank_info(
    rank: int, version: int, *, min_version: int | None = None, host: str = "node-a"
) -> RankInfo:
    """What ``rank`` announces: protocol versions ``min_version`` (default:
    ``version``) to ``version``, on ``host``; for the pure judging functions."""
    return RankInfo(
        rank=rank,
        version=version,
        min_version=version if min_version is None else min_version,
        torch_version="2.13.0+cpu",
        hostname=host,
    )


# --------------------------------------------------------------------------- #
# Ranks as threads
# --------------------------------------------------------------------------- #


@dataclass
class ThreadOutcome:
    """What one rank thread's body did: its return value, or the exception it raised."""

    value: Any = None
    exception: Exception | None = None
    finished: float = 0.0  # time.monotonic() when the body returned or raised

    @property
    def error(self) -> str | None:
        return None if self.exception is None else str(self.exception)

    @property
    def result(self) -> Any:
        """The return value, or the exception in its place."""
        return self.value if self.exception is None else self.exception


RankBody = Callable[[dist.Store, int, int], Any]


class RankThreads:
    """Some ranks of one job as threads of this process, each running
    ``body(store, rank, world_size)``: by default the real
    ``check_protocol_version`` with ``timeout_s``.

    Give every rank its own store client (TCPStore, FileStore, PrefixStore over
    either) so the server sees one connection per rank, as in a job; a HashStore
    can only be shared. Threads share this process's environment, so a rank's
    version comes from an override set while it starts, or from a patched
    ``_exchange.local_info``. ``start`` may be called again to add late ranks:
    what upstream's ``MultiThreadedTestCase``, whose threads start together on its
    own threaded backend, cannot express.
    """

    def __init__(self, world_size: int, timeout_s: float, body: RankBody | None = None) -> None:
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.body = body or self._check
        self.outcomes: dict[int, ThreadOutcome] = {}
        # time.monotonic() and time.process_time() when the last started ranks
        # were released: with together=True, the moment all of them were ready.
        self.released_wall = 0.0
        self.released_cpu = 0.0
        self._threads: list[threading.Thread] = []

    def _check(self, store: dist.Store, rank: int, world_size: int) -> int:
        return pv.check_protocol_version(store, rank, world_size, timedelta(seconds=self.timeout_s))

    def start(self, stores: Mapping[int, dist.Store], together: bool = False) -> RankThreads:
        """Start one thread per rank in ``stores``. ``together`` holds them at a
        barrier until all are running, so that a timing starts at one instant."""
        barrier = threading.Barrier(len(stores), action=self._mark_release) if together else None
        if barrier is None:
            self._mark_release()
        for rank, store in stores.items():
            thread = threading.Thread(target=self._run, args=(rank, store, barrier), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _mark_release(self) -> None:
        self.released_wall, self.released_cpu = time.monotonic(), time.process_time()

    def _run(self, rank: int, store: dist.Store, barrier: threading.Barrier | None) -> None:
        if barrier is not None:
            barrier.wait()
        outcome = ThreadOutcome()
        try:
            outcome.value = self.body(store, rank, self.world_size)
        except Exception as e:
            outcome.exception = e
        outcome.finished = time.monotonic()
        self.outcomes[rank] = outcome

    def done(self) -> bool:
        """Whether every started rank has returned or raised."""
        return not any(thread.is_alive() for thread in self._threads)

    def join(self) -> dict[int, ThreadOutcome]:
        """Wait for every started rank, ordered by rank; none may outlive its
        timeout by more than ``SLACK_S``."""
        deadline = time.monotonic() + self.timeout_s + SLACK_S
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        if any(thread.is_alive() for thread in self._threads):
            raise TimeoutError(f"a rank still runs {SLACK_S}s past its {self.timeout_s}s timeout")
        return dict(sorted(self.outcomes.items()))


def read_verdict_as(
    store: dist.Store,
    ranks: Sequence[int],
    namespace: str = "check/0/0",
    family: Family = C10D,
    timeout_s: float = SLACK_S,
) -> bytes:
    """Play ``ranks``, whose payloads a test wrote into their slots of the check
    under ``namespace`` (``check/0/0``: the first ``check_protocol_version`` call
    with a store object), through the rest of the check as a rank of this build
    does: wait for rank 0's verdict, delete its slot and count itself out; the last
    reader removes the check's keys (unless the verdict was reached without some
    ranks), then, for a failing verdict, sets ``left``, for which rank 0 holds the store.
    Returns the verdict as read."""
    verdict_key = family.key(namespace, "verdict")
    store.wait([verdict_key], timedelta(seconds=timeout_s))
    raw = store.get(verdict_key)
    verdict = json.loads(raw)
    for rank in ranks:
        store.delete_key(family.key(namespace, "rank", rank))
        if store.add(family.key(namespace, "read"), 1) == verdict["readers"]:
            if not verdict.get("without"):
                for key in (verdict_key, family.key(namespace, "read"), family.key(namespace, "rank", 0)):
                    store.delete_key(key)
            if verdict["negotiated"] is None:
                store.set(family.key(namespace, "left"), "")
    return raw


def run_in_own_session(
    cmd: Sequence[str], timeout: float, env: Mapping[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], bool]:
    """Run ``cmd`` (stdout and stderr merged) in a session of its own; return the
    result and whether it timed out.

    Launchers (torchrun, pytest spawning ranks) leave children behind when they
    are killed or exit early, so the whole process group is killed on a timeout
    and again once the command has returned. Its temporary files (torchrun's
    ``torchelastic_*`` log directories) go to a directory removed afterwards.
    """
    with tempfile.TemporaryDirectory(prefix="pv-session-", ignore_cleanup_errors=True) as tmp:
        return _run_in_session(cmd, timeout, {**(os.environ if env is None else env), "TMPDIR": tmp})


def _run_in_session(
    cmd: Sequence[str], timeout: float, env: Mapping[str, str]
) -> tuple[subprocess.CompletedProcess[str], bool]:
    proc = subprocess.Popen(
        list(cmd), env=dict(env), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        try:
            output, _ = proc.communicate(timeout=SLACK_S)
        except subprocess.TimeoutExpired as e:  # torchrun's workers, in sessions of their own, hold the pipe
            output = e.output.decode(errors="replace") if isinstance(e.output, bytes) else (e.output or "")
            proc.stdout.close()
            proc.wait()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, output, None), timed_out
