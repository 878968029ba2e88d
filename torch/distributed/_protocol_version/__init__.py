"""Protocol version guardrail for ``torch.distributed``.

Every build of this fork declares the range of c10d wire protocol versions it can
speak: ``[MIN_PROTOCOL_VERSION, PROTOCOL_VERSION]``. ``init_process_group`` calls
:func:`_check_protocol_version` after the rendezvous store exists and before any
backend is built, so a job that mixes incompatible builds (a rolling update gone
wrong) fails early, on every rank, with one message that names the stragglers,
instead of hanging in backend setup or corrupting data in a collective.

How the check talks through the store (all keys live under ``_KEY_PREFIX``):

* Rank 0 coordinates. It opens a fresh *epoch* ``e`` (an atomic counter), publishes
  its own payload, then reads every other rank's payload with one ``multi_get``,
  judges them and publishes one verdict for the epoch.
* Every other rank reads the current epoch with one ``get`` (it blocks until rank
  0 has opened one), publishes its payload in it with one ``set`` and blocks on the
  verdict with one ``get``. Rank 0 publishes the verdict and marks the epoch
  closed in the same write, so a rank that reads a closed epoch (left by an earlier
  attempt on this store, or an earlier call) waits for the next one instead of
  taking an old verdict for its own. Only when the verdict is a failure does a
  rank write one more key, an acknowledgement rank 0 waits for before it raises
  (rank 0 often hosts the store server, which must outlive the others' reads).

So a non-coordinating rank makes three store calls whatever the world size (O(1)
per rank, O(N) globally); the coordinator makes four (five on a reused store), one
of which reads N payloads. Epochs make the check repeat-safe on one store: a
second ``init``, a restarted job (even with more ranks) or a direct second call
judges only the payloads of the new arrivals, never an earlier verdict. Payloads
and verdicts are JSON, parsed and validated; nothing read from the store is
unpickled or evaluated.

Environment variables (read on every check):

* ``TORCH_DISTRIBUTED_PROTOCOL_VERSION_OVERRIDE``: pretend this rank speaks exactly
  this version (its minimum becomes the same number). For tests that simulate
  mixed builds; never for production.
* ``TORCH_DISTRIBUTED_MIN_PROTOCOL_VERSION_OVERRIDE``: override the minimum as well,
  to simulate a build that speaks a range.
* ``TORCH_DISTRIBUTED_PROTOCOL_CHECK``: ``error`` (default), ``warn`` or ``off``.

Run ``python -m torch.distributed._protocol_version`` to see what a node will
announce before it joins a job.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist


__all__ = [
    "PROTOCOL_VERSION",
    "MIN_PROTOCOL_VERSION",
    "check_protocol_version",
    "get_group_protocol_version",
    "get_min_protocol_version",
    "get_protocol_version",
]

from torch.distributed._protocol_version._versions import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION

VERSION_OVERRIDE_ENV = "TORCH_DISTRIBUTED_PROTOCOL_VERSION_OVERRIDE"
MIN_VERSION_OVERRIDE_ENV = "TORCH_DISTRIBUTED_MIN_PROTOCOL_VERSION_OVERRIDE"
CHECK_MODE_ENV = "TORCH_DISTRIBUTED_PROTOCOL_CHECK"
CHECK_MODES = ("error", "warn", "off")

_KEY_PREFIX = "protocol_version"
_SUPERSEDED = "superseded"
# Appended to the "current" epoch once its verdict is out (see _await_verdict).
_CLOSED = " closed"
_MAX_INT64 = 2**63 - 1
# A payload is a few hundred bytes; anything far larger is not from this check.
_MAX_PAYLOAD_BYTES = 64 * 1024
# How many hosts, or invalid ranks, one line of a message lists before "and N more".
_MAX_LISTED = 8
_MAX_TEXT_FIELD = 128
# How long rank 0 waits for the others to read a failing verdict (see _await_acks).
_ACK_GRACE_SECONDS = 30.0

# The c10d logger: the outcome lands beside init_process_group's own log lines.
logger = logging.getLogger("torch.distributed.distributed_c10d")

# Negotiated version of the default group, recorded by the last check that
# init_process_group ran; None when the check was off or found no common version.
_default_group_version: int | None = None
_default_group_note: str = "init_process_group has not run the protocol version check"


# --------------------------------------------------------------------------- #
# This rank's versions and settings
# --------------------------------------------------------------------------- #


def _parse_version_env(name: str) -> int | None:
    """Parse a version override; ``None`` when unset.

    Only ASCII decimal digits are accepted, because ``int()`` would also take
    ``"1_0"``, ``"+1"`` or Arabic-Indic digits, and a version that reads
    differently to the operator than to the program defeats the point.
    """
    raw = os.environ.get(name)
    if raw is None:
        return None
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or int(text) > _MAX_INT64:
        raise RuntimeError(
            f"{name}={raw!r} is not a valid protocol version: expected a decimal "
            f"integer between 0 and {_MAX_INT64} (surrounding whitespace allowed)."
        )
    return int(text)


def get_protocol_version() -> int:
    """Return the protocol version this rank announces.

    That is :data:`PROTOCOL_VERSION` unless
    ``TORCH_DISTRIBUTED_PROTOCOL_VERSION_OVERRIDE`` is set (tests use it to simulate
    a job that mixes builds). Raises ``RuntimeError`` on an invalid override.
    """
    override = _parse_version_env(VERSION_OVERRIDE_ENV)
    return PROTOCOL_VERSION if override is None else override


def get_min_protocol_version() -> int:
    """Return the oldest protocol version this rank accepts from its peers.

    ``TORCH_DISTRIBUTED_MIN_PROTOCOL_VERSION_OVERRIDE`` wins when set. Otherwise a
    version override alone keeps meaning "exactly this version", so the minimum
    follows it; without any override it is :data:`MIN_PROTOCOL_VERSION`.
    """
    version = get_protocol_version()
    override = _parse_version_env(MIN_VERSION_OVERRIDE_ENV)
    if override is None:
        override_set = os.environ.get(VERSION_OVERRIDE_ENV) is not None
        minimum = version if override_set else MIN_PROTOCOL_VERSION
    else:
        minimum = override
    if minimum > version:
        raise RuntimeError(
            f"{MIN_VERSION_OVERRIDE_ENV}={minimum} is above this rank's protocol "
            f"version {version}: a build cannot require more than it speaks."
        )
    return minimum


def _check_mode() -> str:
    """Return ``TORCH_DISTRIBUTED_PROTOCOL_CHECK`` (default ``error``), validated."""
    raw = os.environ.get(CHECK_MODE_ENV)
    if raw is None:
        return "error"
    mode = raw.strip().lower()
    if mode not in CHECK_MODES:
        raise RuntimeError(
            f"{CHECK_MODE_ENV}={raw!r} is not a valid mode: expected one of "
            f"{', '.join(CHECK_MODES)}."
        )
    return mode


# --------------------------------------------------------------------------- #
# Payloads: what each rank publishes, parsed strictly
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class _RankInfo:
    """What one rank announced. Unknown JSON fields are ignored on purpose, so a
    later build can add fields without breaking this one."""

    rank: int
    version: int
    min_version: int
    torch_version: str
    hostname: str
    pid: int | None

    def to_payload(self, token: str) -> str:
        """Serialise for the store; ``token`` makes this attempt's payload unique."""
        return json.dumps(
            {
                "protocol_version": self.version,
                "min_protocol_version": self.min_version,
                "torch_version": self.torch_version,
                "hostname": self.hostname,
                "pid": self.pid,
                "token": token,
            },
            sort_keys=True,
        )


def _local_info(rank: int) -> _RankInfo:
    return _RankInfo(
        rank=rank,
        version=get_protocol_version(),
        min_version=get_min_protocol_version(),
        torch_version=torch.__version__,
        hostname=socket.gethostname(),
        pid=os.getpid(),
    )


class _InvalidPayload(ValueError):
    """A rank published something that is not a valid payload."""


def _as_version(obj: dict[str, Any], field: str, default: int | None = None) -> int:
    value = obj.get(field, default)
    # bool is an int subclass; True is not a protocol version.
    if type(value) is not int or not 0 <= value <= _MAX_INT64:
        raise _InvalidPayload(f"{field!r} must be an integer in [0, 2**63), got {value!r:.40}")
    return value


def _as_text(obj: dict[str, Any], field: str) -> str:
    value = obj.get(field, "unknown")
    if not isinstance(value, str):
        raise _InvalidPayload(f"{field!r} must be a string, got {type(value).__name__}")
    printable = "".join(ch if ch.isprintable() else "?" for ch in value)
    return printable[:_MAX_TEXT_FIELD] or "unknown"


def _parse_payload(rank: int, raw: bytes) -> _RankInfo:
    """Validate one rank's payload; raises :class:`_InvalidPayload` with the reason."""
    if len(raw) > _MAX_PAYLOAD_BYTES:
        raise _InvalidPayload(f"{len(raw)} bytes, over the {_MAX_PAYLOAD_BYTES}-byte limit")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _InvalidPayload(f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise _InvalidPayload(f"expected a JSON object, got {type(obj).__name__}")
    version = _as_version(obj, "protocol_version")
    min_version = _as_version(obj, "min_protocol_version", default=version)
    if min_version > version:
        raise _InvalidPayload(f"minimum version {min_version} is above its version {version}")
    pid = obj.get("pid")
    return _RankInfo(
        rank=rank,
        version=version,
        min_version=min_version,
        torch_version=_as_text(obj, "torch_version"),
        hostname=_as_text(obj, "hostname"),
        pid=pid if type(pid) is int else None,
    )


# --------------------------------------------------------------------------- #
# Judging: pure functions over the payloads
# --------------------------------------------------------------------------- #


def _compress_ranks(ranks: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``: readable at any world size."""
    spans: list[str] = []
    ordered = sorted(set(ranks))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        spans.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(spans)


def _plural(count: int, word: str) -> str:
    return word if count == 1 else f"{word}s"


def _ranks_phrase(ranks: Sequence[int], singular_verb: str = "", plural_verb: str = "") -> str:
    """``[3]`` -> ``"rank 3"``, ``[0, 1, 2]`` -> ``"ranks 0-2"``, with a verb that agrees."""
    verb = singular_verb if len(ranks) == 1 else plural_verb
    return f"{_plural(len(ranks), 'rank')} {_compress_ranks(ranks)}{' ' + verb if verb else ''}"


def _list_some(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    extra = len(items) - _MAX_LISTED
    return f"{shown} and {extra} more" if extra > 0 else shown


def _negotiate(infos: Sequence[_RankInfo]) -> int | None:
    """The highest version every rank speaks, or ``None`` when there is none.

    Ranks ``a`` and ``b`` are compatible when each one's version is at least the
    other's minimum; that holds for every pair exactly when the lowest version is
    at least the highest minimum, and then the lowest version is the answer.
    """
    lowest_version = min(info.version for info in infos)
    highest_minimum = max(info.min_version for info in infos)
    return lowest_version if lowest_version >= highest_minimum else None


def _range_text(version: int, min_version: int) -> str:
    if version == min_version:
        return f"protocol version {version}"
    return f"protocol versions {min_version}-{version}"


def _describe_groups(infos: Sequence[_RankInfo]) -> list[str]:
    """One line per distinct (range, torch version): its ranks and hosts."""
    groups: dict[tuple[int, int, str], list[_RankInfo]] = {}
    for info in infos:
        groups.setdefault((info.version, info.min_version, info.torch_version), []).append(info)
    lines = []
    for (version, min_version, torch_version), members in sorted(groups.items()):
        ranks = [m.rank for m in members]
        hosts = sorted({m.hostname for m in members})
        lines.append(
            f"  {_range_text(version, min_version)}: {_ranks_phrase(ranks)} "
            f"on {_plural(len(hosts), 'host')} "
            f"{_list_some(hosts)} (torch {torch_version})"
        )
    return lines


def _mismatch_detail(infos: Sequence[_RankInfo], backend: str) -> str:
    """The shared part of the mismatch error: who runs what, why, and what to do."""
    required = max(info.min_version for info in infos)
    stragglers = [info.rank for info in infos if info.version < required]
    demanding = [info.rank for info in infos if info.min_version == required]
    newest_straggler = max(info.version for info in infos if info.version < required)
    lines = [
        f"torch.distributed protocol version mismatch: the {len(infos)} ranks of this "
        f"job (backend {backend}) run builds that cannot talk to each other.",
        *_describe_groups(infos),
        f"Why: {_ranks_phrase(demanding, 'accepts', 'accept')} nothing older than protocol "
        f"version {required}, but {_ranks_phrase(stragglers, 'speaks', 'speak')} at most "
        f"version {newest_straggler}.",
        f"What to do: upgrade {_ranks_phrase(stragglers)} to a build that speaks protocol "
        f"version {required} (or roll {_ranks_phrase(demanding)} back), then restart the job. "
        f"{VERSION_OVERRIDE_ENV} and {MIN_VERSION_OVERRIDE_ENV} only simulate other builds "
        "in tests; unset them in production.",
    ]
    return "\n".join(lines)


def _invalid_detail(problems: Sequence[tuple[int, str]], backend: str) -> str:
    lines = [
        f"torch.distributed protocol version check failed (backend {backend}): "
        f"{len(problems)} {_plural(len(problems), 'rank')} published an invalid "
        "protocol version payload, so this job cannot be judged safe:"
    ]
    lines += [f"  rank {rank}: {reason}" for rank, reason in problems[:_MAX_LISTED]]
    if len(problems) > _MAX_LISTED:
        lines.append(f"  and {len(problems) - _MAX_LISTED} more")
    lines.append(
        "Something other than this check wrote to its keys in the rendezvous store, "
        "or a build that speaks another payload format joined the job."
    )
    return "\n".join(lines)


def _missing_detail(missing: Sequence[int], timeout: timedelta, backend: str) -> str:
    return (
        f"torch.distributed protocol version check timed out after "
        f"{timeout.total_seconds():g}s (backend {backend}): "
        f"{_ranks_phrase(missing)} never published "
        "a protocol version. They may run a build without this check (or with "
        f"{CHECK_MODE_ENV}=off), may not have started, or may have died."
    )


@dataclass(frozen=True)
class _Verdict:
    """One epoch's outcome, computed by rank 0 and read by everyone."""

    status: str  # "ok" | "mismatch" | "invalid" | "timeout"
    detail: str
    negotiated: int | None

    def to_json(self) -> str:
        return json.dumps(
            {"status": self.status, "detail": self.detail, "negotiated": self.negotiated}
        )

    @classmethod
    def from_json(cls, raw: bytes) -> _Verdict:
        try:
            obj = json.loads(raw.decode("utf-8"))
            status, detail, negotiated = obj["status"], obj["detail"], obj["negotiated"]
        except (UnicodeDecodeError, ValueError, TypeError, KeyError) as e:
            raise _InvalidPayload(f"an unreadable verdict ({e!r:.80})") from None
        if status not in ("ok", "mismatch", "invalid", "timeout") or not isinstance(detail, str):
            raise _InvalidPayload(f"a verdict with an unknown status {status!r:.40}")
        if status == "ok" and type(negotiated) is not int:
            raise _InvalidPayload("an 'ok' verdict without a negotiated version")
        return cls(status, detail, negotiated if status == "ok" else None)


def _judge(infos: Sequence[_RankInfo], backend: str) -> _Verdict:
    negotiated = _negotiate(infos)
    if negotiated is None:
        return _Verdict("mismatch", _mismatch_detail(infos, backend), None)
    return _Verdict("ok", "", negotiated)


def _judge_payloads(raws: Sequence[bytes], backend: str) -> _Verdict:
    """Parse every rank's payload (index = rank) and judge the lot."""
    infos: list[_RankInfo] = []
    problems: list[tuple[int, str]] = []
    for rank, raw in enumerate(raws):
        try:
            infos.append(_parse_payload(rank, raw))
        except _InvalidPayload as e:
            problems.append((rank, str(e)))
    if problems:
        return _Verdict("invalid", _invalid_detail(problems, backend), None)
    return _judge(infos, backend)


# --------------------------------------------------------------------------- #
# The store protocol
# --------------------------------------------------------------------------- #


def _key(*parts: object) -> str:
    return "/".join([_KEY_PREFIX, *map(str, parts)])


class _Deadline:
    """The check's share of ``init_process_group``'s timeout, applied to every
    blocking store call by setting the store's timeout before it."""

    def __init__(self, timeout: timedelta) -> None:
        self.timeout = timeout
        self._end = time.monotonic() + timeout.total_seconds()

    def remaining(self, reserve: float = 0.0) -> timedelta:
        # Never zero: some stores read a zero timeout as "wait forever".
        return timedelta(seconds=max(self._end - reserve - time.monotonic(), 0.001))

    def expired(self, reserve: float = 0.0) -> bool:
        # Store timeouts round to milliseconds, so allow a little slack.
        return time.monotonic() >= self._end - reserve - 0.05


def _coordinator_reserve(timeout: timedelta) -> float:
    """Seconds rank 0 keeps back from the timeout to publish a timeout verdict
    that names the missing ranks before the other ranks give up waiting."""
    return min(timeout.total_seconds() * 0.1, 5.0)


class _StoreFailure(RuntimeError):
    """A store call failed for a reason other than this check's own timeout."""


def _call(deadline: _Deadline, what: str, fn: Any, *args: Any, reserve: float = 0.0) -> Any:
    """Run one store call; a timeout returns ``None``, anything else raises
    :class:`_StoreFailure` with ``what`` as the context the raw error lacks."""
    try:
        return fn(*args)
    except RuntimeError as e:  # DistStoreError, DistNetworkError, FileStore's errors
        if deadline.expired(reserve):
            return None
        raise _StoreFailure(f"the rendezvous store failed while {what}: {e}") from e


def _find_missing(store: dist.Store, keys: Sequence[str]) -> list[int]:
    """Ranks whose slot is empty. One ``check`` per rank: only on the timeout path."""
    return [rank for rank, key in enumerate(keys) if not store.check([key])]


def _coordinate(
    store: dist.Store, world_size: int, payload: str, deadline: _Deadline, backend: str
) -> _Verdict:
    """Rank 0: open a fresh epoch, collect every payload, publish the verdict."""
    epoch = store.add(_key("counter"), 1)
    slots = [_key(epoch, "rank", rank) for rank in range(world_size)]
    # Open this epoch (and the previous one, should its coordinator have died
    # between the counter and this call) so waiting ranks can move on to it.
    opened = [_key(epoch - 1, "open"), _key(epoch, "open"), _key("current")]
    store.multi_set([slots[0], *opened], [payload, "1", "1", str(epoch)])
    if epoch > 1:
        # Ranks still waiting in an earlier epoch that never got a verdict (its
        # coordinator died) are told to move on rather than left to time out.
        stale = _key(epoch - 1, "verdict")
        if store.compare_set(stale, "", _SUPERSEDED) == _SUPERSEDED.encode():
            store.set(stale, _SUPERSEDED)  # the legacy TCPStore server wakes no waiter on compare_set
    verdict, missing = _collect(store, slots, payload, deadline, backend)
    # One write: whoever reads "current" from now on knows this epoch is judged.
    store.multi_set([_key(epoch, "verdict"), _key("current")], [verdict.to_json(), f"{epoch}{_CLOSED}"])
    if verdict.negotiated is None:
        _await_acks(store, epoch, world_size, missing, deadline)
    return verdict


def _collect(
    store: dist.Store, slots: Sequence[str], payload: str, deadline: _Deadline, backend: str
) -> tuple[_Verdict, list[int]]:
    """Read every other rank's payload in one call and judge; on timeout, name the
    ranks whose slot is still empty."""
    reserve = _coordinator_reserve(deadline.timeout)
    store.set_timeout(deadline.remaining(reserve))
    raws = _call(deadline, "collecting payloads", store.multi_get, slots[1:], reserve=reserve)
    if raws is None:
        missing = _find_missing(store, slots)
        if missing:
            return _Verdict("timeout", _missing_detail(missing, deadline.timeout, backend), None), missing
        raws = store.multi_get(slots[1:])  # the last ones came in just now
    return _judge_payloads([payload.encode(), *raws], backend), []


def _await_acks(
    store: dist.Store, epoch: int, world_size: int, missing: Sequence[int], deadline: _Deadline
) -> None:
    """Keep rank 0 here until every rank that published has read the failing verdict.

    Rank 0 often hosts the store server (``env://``, ``tcp://``): if it raised at
    once, its process could exit and take the server down before the others read
    the verdict, and they would fail with a bare connection error instead of the
    verdict. On success there is no such wait: the backend build that follows
    needs the store anyway. The others are already blocked on the verdict, so
    their reads take milliseconds; a rank that died after publishing never
    acknowledges, hence the grace period (within the check's timeout).
    """
    ranks = [rank for rank in range(1, world_size) if rank not in missing]
    acks = [_key(epoch, "ack", rank) for rank in ranks]
    grace = min(deadline.remaining(), timedelta(seconds=_ACK_GRACE_SECONDS))
    try:
        store.wait(acks, grace)
    except RuntimeError:
        silent = [ranks[i] for i in _find_missing(store, acks)]
        logger.warning(
            "Protocol version check: %s did not confirm reading the failing verdict "
            "within %.0fs; they may have died.", _ranks_phrase(silent), grace.total_seconds()
        )


def _await_verdict(
    store: dist.Store, rank: int, payload: str, deadline: _Deadline, backend: str
) -> _Verdict:
    """Any rank but 0: join the open epoch, publish this rank's payload, await the verdict.

    An epoch that is already judged ("current" says closed: an earlier attempt on
    this store, or an earlier call) is never joined: the rank waits for rank 0 to
    open the next one, so it can never take an old verdict for its own.
    """
    store.set_timeout(deadline.remaining())
    raw_current = _call(deadline, "reading the current epoch", store.get, _key("current"))
    if raw_current is None:
        return _coordinator_timeout(store, None, deadline, backend)
    epoch, closed = _parse_current(raw_current)
    while True:
        if closed:
            epoch += 1
            store.set_timeout(deadline.remaining())
            if _call(deadline, "waiting for a new epoch", store.get, _key(epoch, "open")) is None:
                return _coordinator_timeout(store, None, deadline, backend)
        store.set(_key(epoch, "rank", rank), payload)
        store.set_timeout(deadline.remaining())
        raw = _call(deadline, "waiting for the verdict", store.get, _key(epoch, "verdict"))
        if raw is None:
            return _coordinator_timeout(store, epoch, deadline, backend)
        if raw != _SUPERSEDED.encode():
            verdict = _Verdict.from_json(raw)
            if verdict.negotiated is None:
                store.set(_key(epoch, "ack", rank), "1")  # see _await_acks
            return verdict
        closed = True  # abandoned by a coordinator that died: move on


def _parse_current(raw: bytes) -> tuple[int, bool]:
    """``b"12"`` -> ``(12, False)``; ``b"12 closed"`` -> ``(12, True)``."""
    text = raw.decode("ascii", errors="replace")
    number = text.removesuffix(_CLOSED)
    if not (number.isascii() and number.isdigit()):
        raise _InvalidPayload(f"a current epoch that is not an integer ({text[:40]!r})")
    return int(number), number != text


def _coordinator_timeout(
    store: dist.Store, epoch: int | None, deadline: _Deadline, backend: str
) -> _Verdict:
    """A rank other than 0 got no verdict in time: say what rank 0 was doing."""
    published = epoch is not None and store.check([_key(epoch, "rank", 0)])
    state = (
        "published its version but never delivered a verdict"
        if published
        else "never opened the check"
    )
    detail = (
        f"torch.distributed protocol version check timed out after "
        f"{deadline.timeout.total_seconds():g}s (backend {backend}): rank 0, which "
        f"collects every rank's version, {state}. It may run a build without this "
        f"check (or with {CHECK_MODE_ENV}=off), may not have started, or may have died."
    )
    return _Verdict("timeout", detail, None)


def _exchange(
    store: dist.Store, rank: int, world_size: int, timeout: timedelta, backend: str
) -> tuple[_Verdict, _RankInfo]:
    """Run one check on ``store``; the store's own timeout is restored afterwards."""
    info = _local_info(rank)  # raises on a bad override before any store traffic
    if world_size == 1:
        return _judge([info], backend), info
    payload = info.to_payload(secrets.token_hex(8))
    deadline = _Deadline(timeout)
    saved_timeout = store.timeout
    try:
        if rank == 0:
            return _coordinate(store, world_size, payload, deadline, backend), info
        return _await_verdict(store, rank, payload, deadline, backend), info
    except _InvalidPayload as e:
        detail = f"torch.distributed protocol version check: rank 0 published {e}."
        return _Verdict("invalid", detail, None), info
    except _StoreFailure as e:
        raise RuntimeError(f"torch.distributed protocol version check on rank {rank}: {e}") from e
    except RuntimeError as e:  # a store call outside _call: the store is broken
        raise RuntimeError(
            f"torch.distributed protocol version check on rank {rank}: the rendezvous "
            f"store failed: {e}"
        ) from e
    finally:
        try:
            store.set_timeout(saved_timeout)
        except RuntimeError:
            pass  # the store is gone; the error above already says so


def _error_message(verdict: _Verdict, info: _RankInfo) -> str:
    return (
        f"{verdict.detail}\nThis rank (rank {info.rank}, host {info.hostname}) runs "
        f"{_range_text(info.version, info.min_version)}."
    )


def check_protocol_version(
    store: dist.Store,
    rank: int,
    world_size: int,
    timeout: timedelta = timedelta(minutes=30),
    *,
    backend: str = "unknown",
) -> int:
    """Check that every rank speaks a common protocol version, through ``store``.

    For frameworks that build process groups without ``init_process_group`` (for
    example ``ProcessGroupGloo`` constructed directly on a store): call it on every
    rank with the same store, before building the group. Every rank returns the
    negotiated version (the highest version all ranks speak), or every rank
    raises the same ``RuntimeError``. Safe to call again on the same store; each
    call judges only the ranks of that call. Ignores
    ``TORCH_DISTRIBUTED_PROTOCOL_CHECK``: calling it is the decision to check.
    """
    _validate_args(rank, world_size, timeout)
    verdict, info = _exchange(store, rank, world_size, timeout, backend)
    if verdict.negotiated is None:
        raise RuntimeError(_error_message(verdict, info))
    return verdict.negotiated


def _validate_args(rank: int, world_size: int, timeout: timedelta) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if timeout.total_seconds() <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")


def _check_protocol_version(
    store: dist.Store, rank: int, world_size: int, timeout: timedelta, backend: object
) -> None:
    """The hook ``init_process_group`` calls before it builds the backend.

    Skipped for the fake backend (its store is a stand-in that records nothing).
    MPI never reaches this call: it has no store. Records the negotiated version
    for :func:`get_group_protocol_version`.
    """
    global _default_group_version, _default_group_note
    _default_group_version = None
    mode = _check_mode()
    if str(backend) == "fake":
        _default_group_note = "the fake backend has no store to check through"
        return
    if mode == "off":
        _default_group_note = f"the check was off ({CHECK_MODE_ENV}=off)"
        return
    started = time.monotonic()
    verdict, info = _exchange(store, rank, world_size, timeout, str(backend))
    elapsed = time.monotonic() - started
    if verdict.negotiated is not None:
        _default_group_version = verdict.negotiated
        logger.info(
            "Rank %s: protocol version check passed in %.3fs: world size %s, "
            "negotiated protocol version %s (this rank speaks %s-%s).",
            rank, elapsed, world_size, verdict.negotiated, info.min_version, info.version,
        )
        return
    message = _error_message(verdict, info)
    if mode == "warn" and verdict.status == "mismatch":
        _default_group_note = f"the ranks share no protocol version ({CHECK_MODE_ENV}=warn)"
        logger.warning("%s\n%s=warn: continuing anyway.", message, CHECK_MODE_ENV)
        return
    logger.error("Rank %s: protocol version check failed after %.3fs.", rank, elapsed)
    raise RuntimeError(message)


def get_group_protocol_version() -> int:
    """Return the protocol version the default process group negotiated.

    Code that changes the wire protocol branches on this: new behaviour switches
    on only once every rank speaks the new version. Raises ``RuntimeError`` when
    there is no default group, or when its init did not negotiate a version
    (check off, mismatch downgraded to a warning, MPI or fake backend).
    """
    if not dist.is_initialized():
        raise RuntimeError(
            "get_group_protocol_version() needs the default process group: call "
            "torch.distributed.init_process_group() first."
        )
    backend = str(dist.get_backend())
    if backend in ("mpi", "fake"):
        raise RuntimeError(f"the {backend} backend does not negotiate a protocol version")
    if _default_group_version is None:
        raise RuntimeError(f"no protocol version was negotiated: {_default_group_note}")
    return _default_group_version


# --------------------------------------------------------------------------- #
# Operator CLI: python -m torch.distributed._protocol_version [--json]
# --------------------------------------------------------------------------- #


def _describe_build() -> dict[str, Any]:
    """What this node will announce; raises ``RuntimeError`` on a bad setting."""
    return {
        "protocol_version": get_protocol_version(),
        "min_protocol_version": get_min_protocol_version(),
        "torch_version": torch.__version__,
        "check_mode": _check_mode(),
        "overrides": {
            name: os.environ[name]
            for name in (VERSION_OVERRIDE_ENV, MIN_VERSION_OVERRIDE_ENV)
            if name in os.environ
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Print this build's protocol versions and settings; exit 2 on a bad setting."""
    parser = argparse.ArgumentParser(
        prog="python -m torch.distributed._protocol_version",
        description="Show the torch.distributed protocol version this node announces.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        build = _describe_build()
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(build, sort_keys=True))
        return 0
    overrides = ", ".join(f"{k}={v!r}" for k, v in build["overrides"].items()) or "none"
    print(f"protocol version:     {build['protocol_version']}")
    print(f"minimum accepted:     {build['min_protocol_version']}")
    print(f"torch version:        {build['torch_version']}")
    print(f"check mode:           {build['check_mode']}")
    print(f"overrides in effect:  {overrides}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
