"""Spawn helpers shared by the protocol version tests, demo and benchmarks.

Every rank is a real process started with the ``spawn`` method (a fresh
interpreter, like a real node), so environment overrides, the hook and gloo are
exercised exactly as in a job. A rank's outcome comes back through a queue as
plain data; the parent never waits past its own deadline and kills what is left.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Mapping, Sequence

import torch.distributed as dist
import torch.multiprocessing as mp


VERSION_ENV = "TORCH_DISTRIBUTED_PROTOCOL_VERSION_OVERRIDE"
MIN_VERSION_ENV = "TORCH_DISTRIBUTED_MIN_PROTOCOL_VERSION_OVERRIDE"
MODE_ENV = "TORCH_DISTRIBUTED_PROTOCOL_CHECK"
GUARDRAIL_ENVS = (VERSION_ENV, MIN_VERSION_ENV, MODE_ENV)


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    env: Mapping[str, str | None],
    args: tuple[Any, ...],
    results: Any,
) -> None:
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
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
) -> list[RankResult]:
    """Run ``fn(rank, world_size, *args)`` in one spawned process per rank.

    ``rank_env`` sets (or, with ``None``, unsets) variables for single ranks on top
    of ``common_env``; the guardrail's own variables are unset unless given, so a
    developer's shell cannot leak into a test. ``ranks`` starts only some ranks
    (to simulate one that never arrives). Results come back ordered by rank; a
    rank that died without reporting has only its ``exitcode``.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    started = list(range(world_size)) if ranks is None else list(ranks)
    procs = {}
    for rank in started:
        env: dict[str, str | None] = {name: None for name in GUARDRAIL_ENVS}
        env.update(common_env or {})
        env.update((rank_env or {}).get(rank, {}))
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
    return {rank: {VERSION_ENV: str(version)} for rank, version in versions.items()}


def run_in_own_session(
    cmd: Sequence[str], timeout: float, env: Mapping[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], bool]:
    """Run ``cmd`` (stdout and stderr merged) in a session of its own; return the
    result and whether it timed out.

    Launchers (torchrun, pytest spawning ranks) leave children behind when they
    are killed or exit early, so the whole process group is killed on a timeout
    and again once the command has returned.
    """
    proc = subprocess.Popen(
        list(cmd), env=None if env is None else dict(env), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, output, None), timed_out
