"""Protocol version guardrail for ``torch.distributed``: every build speaks the c10d wire protocol
versions ``[MIN_PROTOCOL_VERSION, PROTOCOL_VERSION]``, and ``_new_process_group_helper`` calls
:func:`_check_protocol_version` right before it builds the default group's backend, so that a job
mixing incompatible builds fails there, on every rank, with one message naming ranks, hosts and
builds. ``_rpc``, ``_agent``, ``_preflight`` and ``_cli`` load with their entry points."""

import itertools
import logging
import os
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import timedelta

import torch.distributed as dist
from torch import cuda
from torch._C._distributed_c10d import Store
from torch.distributed._protocol_version._exchange import exchange, mode_or_tell, ProtocolVersionError, raise_on_failure
from torch.distributed._protocol_version._families import C10D, RPC
from torch.distributed._protocol_version._judge import joined
from torch.distributed._protocol_version._payload import local_info
from torch.distributed._protocol_version._settings import CHECK_MODE_ENV, CHECK_MODES, parse_version, SettingError
from torch.distributed._protocol_version._store import delete
from torch.distributed._protocol_version._versions import (
    MIN_PROTOCOL_VERSION, MIN_RPC_PROTOCOL_VERSION, PROTOCOL_VERSION, RPC_PROTOCOL_VERSION,
)


__all__ = [
    "CHECK_MODE_ENV", "CHECK_MODES", "MIN_PROTOCOL_VERSION", "MIN_RPC_PROTOCOL_VERSION",
    "MIN_VERSION_OVERRIDE_ENV", "PROTOCOL_VERSION", "ProtocolVersionError", "RPC_MIN_VERSION_OVERRIDE_ENV",
    "RPC_PROTOCOL_VERSION", "RPC_VERSION_OVERRIDE_ENV", "SettingError", "VERSION_OVERRIDE_ENV",
    "check_protocol_version", "get_group_protocol_version", "get_rpc_protocol_version",
]

VERSION_OVERRIDE_ENV, MIN_VERSION_OVERRIDE_ENV = C10D.version_env, C10D.min_version_env
RPC_VERSION_OVERRIDE_ENV, RPC_MIN_VERSION_OVERRIDE_ENV = RPC.version_env, RPC.min_version_env
RESTART_COUNT_ENV, AGENT_STORE_ENV = "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE"
# Set by torchrun's agents for the workers they start: rank 0 agent's name for the round they checked, and,
# where some node was not seen to check, their verdict: the negotiated version, or "none".
ROUND_ENV, AGENTS_VERDICT_ENV = "TORCH_DISTRIBUTED_PROTOCOL_ROUND", "TORCH_DISTRIBUTED_PROTOCOL_AGENTS_VERDICT"

logger = logging.getLogger(__name__)

# The version each checked default group negotiated (None: none), keyed by its store: it dies with the group.
_negotiated: weakref.WeakKeyDictionary[Store, int | None] = weakref.WeakKeyDictionary()
_rpc_negotiated: dict[str, int | None] = {"version": None}  # the last init_rpc's, set by ``_rpc``
# Calls of check_protocol_version each rank made with each store object.
_calls: weakref.WeakKeyDictionary[Store, defaultdict[int, Iterator[int]]] = weakref.WeakKeyDictionary()
# Default groups of several ranks this process initialised, whatever its mode: gloo's key per rank is a trace
# in its first only.
_process_inits = itertools.count()


class _ThreadInits(threading.local):
    """Default groups this thread initialised, whatever its mode: threads may stand for ranks (each its own
    count); else a process counts every init whatever its rank, so ranks swapped on a re-init agree. A rank
    that inits from a new thread each time starts again at 0, in the namespace its last clean check left empty."""

    def __init__(self) -> None:
        self.count = itertools.count()


_thread_inits = _ThreadInits()


def _attempt_namespace(kind: str, count: int) -> tuple[str, bool]:
    """A check's namespace, the same on every rank of one attempt and never used twice on a store, and
    whether it is the attempt's first. ``count`` tells re-inits in one process apart. Where workers share
    the agent's store, which outlives an attempt, the round the agents checked tells attempts apart, else
    torchrun's restart count (a node restarting for another's sake keeps it); elsewhere each attempt has
    a store of its own."""
    agent_store = os.environ.get(AGENT_STORE_ENV) == "True"
    restart = os.environ.get(RESTART_COUNT_ENV, "0") if agent_store else "0"
    attempt = (os.environ.get(ROUND_ENV) or restart) if agent_store else "0"
    return f"{kind}/{attempt}/{count}", restart == "0" and count == 0


def _agents_word_applies(rank: int, world_size: int) -> bool:
    """Whether torchrun's agents' word (``ROUND_ENV``, ``AGENTS_VERDICT_ENV``) is about this group, the one they
    started this worker for: a process a worker starts inherits the variables, not as a rule its rank and size."""
    return os.environ.get("RANK") == str(rank) and os.environ.get("WORLD_SIZE") == str(world_size)


def _take_agents_verdict(word: str, group_store: Store, rank: int, mode: str, backend: str) -> None:
    """torchrun's agents judged this round with nodes whose workers never publish: this rank takes their
    verdict ``word`` (``none``: no version) where it speaks the version they negotiated."""
    negotiated = None if word.strip() == "none" else parse_version(AGENTS_VERDICT_ENV, word)
    if negotiated is None:
        return
    info = local_info(rank, C10D, mode)
    verdict = joined(C10D, info, backend, f"rank {rank} took the verdict of torchrun's agents", negotiated, False)
    raise_on_failure(verdict, info, C10D)
    _negotiated[group_store] = verdict.negotiated


def gloo_key(group_name: str, device: str) -> Callable[[int], str]:
    """Where ``ProcessGroupGloo`` writes a rank's address as it starts (a test asserts it against real gloo)."""
    return lambda rank: f"{group_name}//{device}//0/{rank}"


def _stock_refuses(backend: str, rank: int, world_size: int) -> bool:
    """Whether stock refuses this rank first: a bad rank, a built-in backend this build lacks (2.14: one its own
    creator makes), or ProcessGroupNCCL without GPUs (2.13: "nccl"; 2.14: what its NCCL creator makes)."""
    creator = getattr(dist.Backend._plugins.get(backend.upper()), "creator_fn", None)
    own = getattr(creator, "__module__", "") == dist.distributed_c10d.__name__
    lacked = own and not getattr(dist, f"is_{backend}_available", lambda: True)()
    nccl = getattr(creator, "__name__", "") == "_create_nccl_process_group" if own else backend == "nccl"
    return not 0 <= rank < world_size or lacked or nccl and not cuda.device_count()


def _check_protocol_version(
    store: Store, group_store: Store, rank: int, world_size: int, timeout: timedelta,
    backend: str, device: str, group_name: str, default_group: bool,
) -> None:
    """The hook ``_new_process_group_helper`` calls right before it builds a backend: checks the default group
    once. Gloo's key per rank shows a rank without the check only in the first group of a first attempt: later
    ones may find an earlier group's key (gloo would read it too), so each deletes its own."""
    if not default_group or group_store in _negotiated or backend in ("fake", "mpi"):  # no store to check through
        return
    _negotiated[group_store] = None
    if _stock_refuses(backend, rank, world_size):
        return
    inits = (next(_thread_inits.count), next(_process_inits)) if world_size > 1 else (0, 0)  # 1 rank: no store traffic
    namespace, first = _attempt_namespace("c10d", inits[0])
    mode = mode_or_tell(store, C10D, namespace, rank, world_size, backend)
    if mode is None:
        return
    applies = _agents_word_applies(rank, world_size)
    if applies and AGENTS_VERDICT_ENV in os.environ:
        _take_agents_verdict(os.environ[AGENTS_VERDICT_ENV], group_store, rank, mode, backend)
        return
    first = first and inits[1] == 0  # a later init (from another thread, as another rank) may find a key of gloo
    trace = gloo_key(group_name, device) if backend == "gloo" else None
    if trace is not None and not first:
        delete(store, [trace(rank)])
    started = time.monotonic()
    # Where torchrun's agents all checked this round (its name says so), so does every worker: warn waits too.
    expected = applies and bool(os.environ.get(ROUND_ENV))
    if expected and rank == 0 and os.environ.get(RESTART_COUNT_ENV, "0") != "0":  # the static rendezvous keeps that
        # name for the job: a restarted rank 0 takes over the check of the one its agent stopped
        delete(store, [C10D.key(namespace, part) for part in ("rank/0", "verdict", "read", "left")])
    outcome = exchange(store, C10D, rank, world_size, timeout, backend, mode, namespace, trace if first else None,
                       expected=expected)
    raise_on_failure(outcome.verdict, outcome.info, C10D)
    if outcome.verdict.ok and not outcome.verdict.without:  # a rank it was reached without may not speak it
        _negotiated[group_store] = outcome.verdict.negotiated
        logger.info("Rank %s: protocol version check passed in %.3fs: negotiated protocol version %s of %s ranks.",
                    rank, time.monotonic() - started, outcome.verdict.negotiated, world_size)


def get_group_protocol_version() -> int:
    """Return the protocol version the default process group negotiated, for code that switches on
    new wire behaviour only once every rank speaks it.

    Returns:
        The highest version every rank of the default group speaks.

    Raises:
        RuntimeError: there is no default group, or its init negotiated no version
            (the check was off, a mismatch was only warned about, ``warn`` went on
            without some ranks, or the backend has no store: MPI, fake).
    """
    if not dist.is_initialized():
        raise RuntimeError("get_group_protocol_version() needs the default process group: call "
                           "torch.distributed.init_process_group() first.")
    c10d = dist.distributed_c10d
    version = _negotiated.get(c10d._get_process_group_store(c10d._get_default_group()))
    if version is None:
        raise RuntimeError(
            f"the default process group negotiated no protocol version: the check was off ({CHECK_MODE_ENV}=off), "
            f"a mismatch was only warned about, the check ({CHECK_MODE_ENV}=warn) went on without some ranks, "
            f"or the backend ({dist.get_backend()}) has no store to check through.")
    return version


def check_protocol_version(
    store: Store, rank: int, world_size: int, timeout: timedelta = timedelta(minutes=30), *,
    backend: str = "unknown",
) -> int:
    """Check that every rank speaks a common protocol version, through ``store``.

    For frameworks that build process groups without ``init_process_group``: call it on every rank
    before building the group (``TORCH_DISTRIBUTED_PROTOCOL_CHECK`` is ignored). Calls with one store
    object are told apart; a new attempt's fresh processes need a fresh ``PrefixStore`` prefix.

    Args:
        store: a store all ranks of this group, and only they, use for the check.
        rank: this rank, in ``[0, world_size)``.
        world_size: the number of ranks.
        timeout: how long this rank waits for the others, from its arrival.
        backend: names the backend in messages.

    Returns:
        The negotiated version: the highest version every rank speaks.

    Raises:
        ProtocolVersionError: the ranks share no protocol version, or one published an invalid payload.
        DistStoreError: a rank did not publish within ``timeout``, or the store holds
            an earlier attempt's check under the same namespace.
        SettingError: an override variable holds an invalid value.
        TypeError, ValueError: an invalid argument.
    """
    if not isinstance(store, Store):
        raise TypeError(f"store must be a torch.distributed.Store, got {type(store).__name__}")
    for name, value in (("rank", rank), ("world_size", world_size)):
        if type(value) is not int:  # bool is an int, and True is no rank
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r:.40}")
    if not isinstance(timeout, timedelta):
        raise TypeError(f"timeout must be a datetime.timedelta, got {type(timeout).__name__} {timeout!r:.40}")
    for bad, problem in ((world_size < 1, f"world_size must be at least 1, got {world_size}"),
                         (not 0 <= rank < world_size, f"rank must be in [0, {world_size}), got {rank}"),
                         (timeout.total_seconds() <= 0, f"timeout must be positive, got {timeout}")):
        if bad:
            raise ValueError(problem)
    namespace, _ = _attempt_namespace("check", next(_calls.setdefault(store, defaultdict(itertools.count))[rank]))
    outcome = exchange(store, C10D, rank, world_size, timeout, backend, "error", namespace)
    raise_on_failure(outcome.verdict, outcome.info, C10D)
    if outcome.verdict.negotiated is None:  # raised already: every rank here runs "error"
        raise ProtocolVersionError(outcome.verdict.detail)
    return outcome.verdict.negotiated


def get_rpc_protocol_version() -> int:
    """Return the RPC protocol version this process's RPC group runs.

    Returns:
        The version the last ``init_rpc`` negotiated.

    Raises:
        RuntimeError: RPC is not initialized, or its init negotiated no version
            (the check was off, a mismatch was only warned about, or ``warn`` went
            on without some workers).
    """
    from torch._C._distributed_rpc import _is_current_rpc_agent_set

    if not _is_current_rpc_agent_set():
        raise RuntimeError("get_rpc_protocol_version() needs RPC: call torch.distributed.rpc.init_rpc() first.")
    if _rpc_negotiated["version"] is None:
        raise RuntimeError(f"no RPC protocol version was negotiated: the check was off ({CHECK_MODE_ENV}=off), "
                           "a mismatch was only warned about, or warn went on without some workers.")
    return _rpc_negotiated["version"]
