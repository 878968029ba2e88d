"""The store protocol of one check. Keys, in the family's namespace: ``current``
(the token of the check rank 0 opened last; ``"<token> closed"`` once judged),
and per check ``<token>/rank/<r>`` (payloads), ``/verdict``, ``/next`` (the
following check's token) and ``/ack/<r>`` (rank ``r`` read a failing verdict).

Rank 0 reads ``current``, opens a check under a fresh random token (one
``multi_set``), waits until every payload is there, judges, then closes the check
and publishes the verdict (one ``multi_set``). Every other rank waits until a
check is open, publishes and blocks on the verdict: O(1) calls per rank. A wait
that outlasts a grace period goes on as a look (``check``) every half second,
which also finds ranks without the check (:mod:`._diagnose`). A rank that finds
the last check closed waits for its ``next``, however long ago it ended, so no
clock decides which check a rank belongs to; it takes that check's verdict only
if rank 0 judged it without this rank. Each rank counts its timeout from its
arrival; a ``warn`` rank waits for the others for a grace period only.
"""

from __future__ import annotations

import logging
import secrets
from datetime import timedelta
from typing import Callable

import torch.distributed as dist
from torch.distributed._protocol_version import _diagnose, _messages
from torch.distributed._protocol_version._families import Family
from torch.distributed._protocol_version._judge import judge
from torch.distributed._protocol_version._payload import InvalidPayload, local_info, RankInfo, Verdict
from torch.distributed._protocol_version._settings import CHECK_MODE_ENV
from torch.distributed._protocol_version._store import Check, Deadline, find_present, POLL_SECONDS, present, wait_for


__all__ = ["ProtocolVersionError", "exchange", "parse_current", "raise_on_failure"]

logger = logging.getLogger(__name__)

_CLOSED = " closed"
_SUPERSEDED = b"superseded"  # the verdict of a check whose rank 0 died before judging
_TOKEN_CHARS = 16
# How long a first wait blocks before the rank looks for ranks without the check, at most.
_GRACE_SECONDS = 1.0
# Bounds of rank 0's wait for the others to read a failing verdict.
_ACK_FLOOR_SECONDS, _ACK_CAP_SECONDS = 1.0, 30.0


class ProtocolVersionError(dist.DistError):
    """The ranks run builds that cannot talk to each other, or one published garbage."""


def parse_current(key: str, raw: bytes) -> tuple[str, bool]:
    """``b"<token>"`` -> ``(token, False)``; ``b"<token> closed"`` -> ``(token, True)``."""
    text = raw.decode("ascii", errors="replace")
    token = text.removesuffix(_CLOSED)
    if len(token) != _TOKEN_CHARS or any(c not in "0123456789abcdef" for c in token):
        raise InvalidPayload(
            f"the key {key} holds {text[:40]!r}, which this check did not write: another "
            "program uses this key in the store"
        )
    return token, token != text


def _read_current(check: Check) -> tuple[str, bool]:
    return parse_current(check.key("current"), check.store.get(check.key("current")))


def _coordinate(check: Check) -> Verdict:
    """Rank 0: open a check, collect every payload, publish the verdict."""
    store, key, token = check.store, check.key, check.token
    check.doing = "opening the check"
    previous = _read_current(check) if present(store, [key("current")]) else None
    keys, values = [key(token, "rank", 0), key("current")], [check.payload, token]
    if previous is not None:  # wake the ranks that wait for a check after it
        keys.append(key(previous[0], "next"))
        values.append(token)
        if not previous[1]:  # its rank 0 died before judging: wake its ranks too
            keys.append(key(previous[0], "verdict"))
            values.append(_SUPERSEDED)
    store.multi_set(keys, values)
    check.doing = "collecting payloads"
    verdict, published = _diagnose.collect(check, previous[0] if previous else None)
    check.doing = "publishing the verdict"
    # Closed first: a rank that has read the verdict and checks again never finds this check open.
    store.multi_set([key("current"), key(token, "verdict")], [token + _CLOSED, verdict.to_json()])
    if not (verdict.ok or verdict.warned):
        check.doing = "waiting for the others to read the verdict"
        _await_acks(check, published)
    return verdict


def _await_acks(check: Check, published: list[int]) -> None:
    """Keep rank 0, which often hosts the store server, until every rank that
    published has read a failing verdict: raising at once could take the server
    down before they read it."""
    acks = [check.key(check.token, "ack", r) for r in published]
    seconds = min(max(check.deadline.remaining(), _ACK_FLOOR_SECONDS), _ACK_CAP_SECONDS)
    if not acks or wait_for(check.store, acks, seconds):
        return
    confirmed = set(find_present(check.store, acks))
    silent = [r for i, r in enumerate(published) if i not in confirmed]
    logger.warning(
        "%s check: within %.1fs, no word from %s that the verdict reached them.",
        check.family.title, seconds, _messages.ranks_phrase(silent),
    )


def _await_open(check: Check, closed: str | None) -> str | Verdict:
    """Any rank but 0: the token of the check rank 0 opens after ``closed`` (the
    last check, over before this rank could take part, or ``None``); or a verdict
    reached without rank 0 (:mod:`._diagnose`)."""
    marked: set[str | None] = set()
    while True:
        announce = check.key("current") if closed is None else check.key(closed, "next")
        grace = check.grace - check.deadline.elapsed()
        if wait_for(check.store, [announce], grace) if grace > 0 else present(check.store, [announce]):
            token, is_closed = _read_current(check)
            if not is_closed:
                return token
            if token != closed:
                closed = token
                continue
        if closed not in marked:
            late = _diagnose.judge_late(check, closed) if closed is not None else None
            if late is not None:
                return late
            _diagnose.leave_mark(check, closed)
            marked.add(closed)
        if _diagnose.went_ahead(check, [0], closed):
            return _diagnose.judge_without_coordinator(check, closed)
        if check.deadline.expired():
            return _diagnose.open_timeout(check, closed)
        check.deadline.pause()


def _participate(check: Check) -> Verdict:
    """Any rank but 0: publish this rank's payload in an open check and await its verdict."""
    store, key = check.store, check.key
    closed = None  # a check that ended before this rank could take part
    while True:
        check.doing = "waiting for rank 0 to open the check"
        token = _await_open(check, closed)
        if isinstance(token, Verdict):
            return token
        check.doing = "publishing this rank's version"
        store.set(key(token, "rank", check.rank), check.payload)
        check.doing = "waiting for the verdict"
        verdict_key = key(token, "verdict")
        # warn: to the end of rank 0's grace period, which began before this rank published (half a second to judge)
        if not wait_for(store, [verdict_key], check.grace + POLL_SECONDS if check.bounded else check.deadline.remaining()):
            verdict = _diagnose.verdict_timeout(check, token)
        else:
            raw = store.get(verdict_key)
            if raw == _SUPERSEDED:
                closed = token
                continue
            verdict = Verdict.from_json(verdict_key, raw)
        if not (verdict.ok or verdict.warned):  # a rank that gave up on its own is done with the store too
            store.set(key(token, "ack", check.rank), "1")  # see _await_acks
        return verdict


def _with_context(error: RuntimeError, text: str) -> RuntimeError:
    """``error``'s own type (DistStoreError, DistNetworkError...) with ``text`` in
    front, so elastic agents and retry code that catch those types still do."""
    try:
        return type(error)(f"{text}: {error}")
    except Exception:  # a type that takes other arguments
        return RuntimeError(f"{text}: {error}")


def exchange(
    store: dist.Store, family: Family, rank: int, world_size: int, timeout: timedelta, backend: str, mode: str,
    backend_key: Callable[[int], str] | None = None, name: str = "", patient: bool = False,
) -> tuple[Verdict, RankInfo]:
    """Run one check of ``family`` on ``store``: this rank's verdict and payload.

    ``mode`` is this rank's ``error`` or ``warn`` (a ``warn`` rank waits for the
    others for the grace period only, unless ``patient``); ``backend_key(rank)`` is where
    a rank's backend writes a key as soon as it starts building (seen: a rank that
    runs no check), or ``None``; ``name`` an RPC worker's name. Raises
    ``SettingError`` on a bad override before any store traffic, and a store
    failure as its own type with what the check was doing.
    """
    info = local_info(rank, family, mode, name)
    if world_size == 1:
        return judge(family, [info], backend), info
    token, grace = secrets.token_hex(_TOKEN_CHARS // 2), min(_GRACE_SECONDS, timeout.total_seconds() / 10)
    bounded = mode == "warn" and not patient
    check = Check(
        store, family, rank, world_size, Deadline(timedelta(seconds=grace) if bounded else timeout), backend, info,
        info.to_payload(family), token, backend_key, grace, bounded,
    )
    try:
        return (_coordinate(check) if rank == 0 else _participate(check)), info
    except InvalidPayload as e:
        return Verdict("invalid", f"{family.title} check ({_messages.backend_text(backend)}): {e}.", None), info
    except RuntimeError as e:  # the store failed
        raise _with_context(e, f"{family.title} check on rank {rank}: the store failed while {check.doing}") from e


def raise_on_failure(verdict: Verdict, info: RankInfo, family: Family) -> None:
    """Raise what a failing verdict means (``DistStoreError`` for a timeout, as
    the store's own waits do, unless this rank runs ``warn``; ``ProtocolVersionError``
    otherwise, unless every checking rank runs ``warn``); log what a verdict must say."""
    if verdict.ok:
        if verdict.detail:
            logger.warning("%s", verdict.detail)
        return
    message = _messages.error_message(verdict.detail, info, family)
    if verdict.status == "timeout" and info.mode == "warn":
        logger.warning("%s\nThis rank runs %s=warn: continuing without a verdict.", message, CHECK_MODE_ENV)
    elif verdict.status == "timeout":
        raise dist.DistStoreError(message)
    elif verdict.warned:
        logger.warning("%s\nEvery checking rank runs %s=warn: continuing anyway.", message, CHECK_MODE_ENV)
    else:
        raise ProtocolVersionError(message)
