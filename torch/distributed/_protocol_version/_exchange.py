"""The store protocol of one check: epochs, payloads, the verdict, acknowledgements.

Rank 0 coordinates. It opens a fresh *epoch* ``e`` (an atomic counter),
publishes its own payload, reads every other rank's payload with one
``multi_get``, and publishes the verdict and marks the epoch closed in one
``multi_set``, then waits (one ``wait``) until every rank has acknowledged it.
Every other rank reads the current epoch with one ``get`` (it blocks until rank
0 has opened one), publishes its payload with one ``set``, blocks on the verdict
with one ``get`` and acknowledges it with one ``set``: four calls whatever the
world size (O(1) per rank, O(N) globally). A rank never joins a closed epoch, so
an earlier attempt's verdict on a reused store is never taken for this one's.

Each rank counts its timeout from its own arrival, as stock torch counts its own
waits. A wait that outlasts a short grace period continues in
:mod:`._diagnose` (the slow path).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from datetime import timedelta
from typing import Callable

import torch.distributed as dist
from torch.distributed._protocol_version import _diagnose, _messages
from torch.distributed._protocol_version._families import Family
from torch.distributed._protocol_version._judge import judge, judge_payloads
from torch.distributed._protocol_version._payload import InvalidPayload, local_info, parse_payload, RankInfo, Verdict
from torch.distributed._protocol_version._settings import CHECK_MODE_ENV
from torch.distributed._protocol_version._store import (
    blocking,
    borrowed_timeout,
    Check,
    Deadline,
    find_present,
    MIN_CALL_SECONDS,
    timed,
)


logger = logging.getLogger("torch.distributed.distributed_c10d")

_SUPERSEDED = b"superseded"
# Appended to the "current" epoch once its verdict is out.
_CLOSED = " closed"
# How long rank 0 waits for the others to read a failing verdict (see _await_acks);
# on the timeout path its deadline has passed, so it grants them this floor.
_ACK_GRACE_SECONDS = 30.0
_ACK_FLOOR_SECONDS = 1.0
# How long a non-zero rank waits past its deadline for a verdict that every rank's
# payload is already in (see _verdict_in_flight).
_VERDICT_IN_FLIGHT_SECONDS = 2.0
# How long a rank that finds the last epoch judged waits for a new one before it
# takes that epoch's timeout verdict as the one that gave up on it (see _late_verdict).
_LATE_GRACE_SECONDS = 2.0


def _grace(timeout: timedelta, world_size: int) -> float:
    """How long a wait blocks before the slow path starts: long enough that ranks
    arriving together never reach it (their spread grows with the world size),
    short enough that a build without the check is seen within about a second."""
    return min(1.0 + world_size / 1000, timeout.total_seconds() / 10)


def _coordinate(check: Check) -> Verdict:
    """Rank 0: open a fresh epoch, collect every payload, publish the verdict."""
    store, key = check.store, check.key
    check.doing = "opening the check"
    epoch = check.epoch = store.add(key("counter"), 1)
    slots = [key(epoch, "rank", r) for r in range(check.world_size)]
    # Open this epoch (and the previous one, should its coordinator have died
    # between the counter and this call) so waiting ranks can move on to it.
    opened = [key(epoch - 1, "open"), key(epoch, "open"), key("current")]
    store.multi_set([slots[0], *opened], [check.payload, "1", "1", str(epoch)])
    if epoch > 1:
        # Ranks still waiting in an earlier epoch that never got a verdict (its
        # coordinator died) are told to move on rather than left to time out.
        stale = key(epoch - 1, "verdict")
        if store.compare_set(stale, "", _SUPERSEDED) == _SUPERSEDED:
            store.set(stale, _SUPERSEDED)  # the legacy TCPStore server wakes no waiter on compare_set
    check.doing = "collecting payloads"
    verdict, published = _collect(check, slots, epoch)
    check.doing = "publishing the verdict"
    # One write: whoever reads "current" from now on knows this epoch is judged.
    store.multi_set([key(epoch, "verdict"), key("current")], [verdict.to_json(), f"{epoch}{_CLOSED}"])
    check.doing = "waiting for the others to read the verdict"
    _await_acks(check, epoch, verdict, published)
    return verdict


def _collect(check: Check, slots: list[str], epoch: int) -> tuple[Verdict, dict[int, bytes]]:
    """Read every payload and judge. Returns the verdict and the payloads of the
    other ranks that published (they wait to read it)."""
    raws = blocking(check, check.grace, check.store.multi_get, slots[1:])
    if raws is not None:
        published = dict(zip(range(1, check.world_size), raws))
        return judge_payloads(check.family, {0: check.payload.encode(), **published}, [], check.backend), published
    ranks, went_ahead, missing = _diagnose.await_payloads(check, slots)
    published = dict(zip(ranks, check.store.multi_get([slots[r] for r in ranks])))
    if missing:
        return _diagnose.coordinator_timeout(check, missing, went_ahead, epoch), published
    payloads = {0: check.payload.encode(), **published}
    return judge_payloads(check.family, payloads, went_ahead, check.backend), published


def _await_acks(check: Check, epoch: int, verdict: Verdict, published: dict[int, bytes]) -> None:
    """Keep rank 0 here until every rank that published is done with the store:
    it has read the verdict, or reached its own timeout.

    Rank 0 often hosts the store server (``env://``, ``tcp://``): if it raised at
    once, or went on and failed at once after a pass (a bad argument that stock
    rejects on every rank only once the check is behind it), its process could
    exit and take the server down before the others read the verdict, and they
    would fail with a bare connection error instead of their own. The others are
    blocked on the verdict, so their reads take milliseconds; on the happy path
    this costs one ``set`` per rank and one ``wait`` on rank 0.

    Every build acknowledges a failing verdict; a pass, only the builds whose
    payload says so (every payload parsed, for a pass to be reached), so that an
    older build never holds rank 0. After a pass rank 0 waits one grace period at
    most: a rank that died after publishing is then left to the backend's own
    timeout, as stock leaves it, instead of costing the job that timeout twice.
    """
    if verdict.ok:
        readers = [rank for rank, raw in published.items() if parse_payload(rank, raw).acks_every_verdict]
        grace = max(check.grace, MIN_CALL_SECONDS)
    else:
        readers = list(published)
        grace = min(max(check.deadline.remaining(), _ACK_FLOOR_SECONDS), _ACK_GRACE_SECONDS)
    if not readers:
        return
    acks = [check.key(epoch, "ack", r) for r in readers]
    try:
        check.store.wait(acks, timedelta(seconds=grace))
    except RuntimeError:
        confirmed = set(find_present(check.store, acks))
        silent = [r for i, r in enumerate(readers) if i not in confirmed]
        if silent:
            logger.log(
                logging.INFO if verdict.ok else logging.WARNING,
                "%s check: within %.1fs, no word from %s that the verdict reached them.",
                check.family.title, grace, _messages.ranks_phrase(silent),
            )


def _parse_current(raw: bytes) -> tuple[int, bool]:
    """``b"12"`` -> ``(12, False)``; ``b"12 closed"`` -> ``(12, True)``."""
    text = raw.decode("ascii", errors="replace")
    number = text.removesuffix(_CLOSED)
    if not (number.isascii() and number.isdigit() and len(number) < 20):
        raise InvalidPayload(f"a current epoch that is not an integer ({text[:40]!r})")
    return int(number), number != text


def _await_open(check: Check, epoch: int, key: str) -> bytes | Verdict:
    """Wait for rank 0 to open ``epoch`` (``key`` appears): one blocking call
    within the grace period, then the slow path."""
    check.doing = "waiting for rank 0 to open the check"
    raw = blocking(check, check.grace, check.store.get, key)
    if raw is not None:
        return raw
    _diagnose.leave_mark(check, epoch)
    return _diagnose.await_coordinator(check, epoch, key)


def _late_verdict(check: Check, epoch: int) -> Verdict | None:
    """The closed ``epoch``'s verdict, when it is a timeout, this rank never
    published in it, and no rank that did already waits for the next epoch: rank
    0 gave up on this rank before it arrived.

    A rank that took part in ``epoch`` and now waits for the next one is in a new
    attempt (or a second call) on a reused store, whose rank 0 has yet to come:
    then this rank waits for it too, instead of taking the last attempt's verdict
    for its own. (A rank that never published in ``epoch`` may be as late for it
    as this one, so its mark tells nothing.) Every rank that finds an epoch closed
    leaves its mark at once (see :func:`_await_verdict`), so the ranks of a new
    attempt see each other's marks however the grace period races between them.
    """
    if check.store.check([check.key(epoch, "rank", check.rank)]):
        return None
    others = [r for r in range(check.world_size) if r != check.rank]
    waiting = [others[i] for i in find_present(check.store, [check.key(epoch + 1, "waiting", r) for r in others])]
    if find_present(check.store, [check.key(epoch, "rank", r) for r in waiting]):
        return None
    raw = check.store.get(check.key(epoch, "verdict"))
    if raw == _SUPERSEDED:
        return None
    verdict = Verdict.from_json(raw)
    if verdict.status != "timeout":
        return None
    # This rank waits for no next check after all: a rank 0 opening one must not
    # count it among the ranks that came and gave up on it. (A store that cannot
    # delete keeps the mark: then only that message would be off.)
    with contextlib.suppress(RuntimeError):
        check.store.delete_key(check.key(epoch + 1, "waiting", check.rank))
    return Verdict(
        "timeout",
        f"{verdict.detail}\nRank {check.rank} arrived after rank 0 had given up waiting for it.",
        None,
    )


def _await_verdict(check: Check) -> Verdict:
    """Any rank but 0: join the open epoch, publish this rank's payload, await the verdict."""
    store, key = check.store, check.key
    current = _await_open(check, 1, key("current"))
    if isinstance(current, Verdict):
        return current
    epoch, closed = _parse_current(current)
    while True:
        if closed:
            check.doing = "waiting for rank 0 to open a new check"
            _diagnose.leave_mark(check, epoch + 1)  # before the grace period: see _late_verdict
            late_grace = min(_LATE_GRACE_SECONDS, check.deadline.timeout.total_seconds() / 5)
            if blocking(check, late_grace, store.get, key(epoch + 1, "open")) is None:
                late = _late_verdict(check, epoch)
                if late is not None:
                    return late
                waited = _diagnose.await_coordinator(check, epoch + 1, key(epoch + 1, "open"))
                if isinstance(waited, Verdict):
                    return waited
            epoch += 1
        check.epoch = epoch
        check.doing = "publishing this rank's version"
        store.set(key(epoch, "rank", check.rank), check.payload)
        check.doing = "waiting for the verdict"
        raw = blocking(check, check.deadline.remaining(), store.get, key(epoch, "verdict"))
        if raw is None:
            raw = _verdict_in_flight(check, epoch)
        if raw != _SUPERSEDED:
            # A rank that gave up on its own still tells rank 0 it is done with the store.
            verdict = _diagnose.verdict_timeout(check, epoch) if raw is None else Verdict.from_json(raw)
            store.set(key(epoch, "ack", check.rank), "1")  # see _await_acks
            return verdict
        closed = True  # abandoned by a coordinator that died: move on


def _verdict_in_flight(check: Check, epoch: int) -> bytes | None:
    """At this rank's deadline: when every rank has published, rank 0 is judging
    a complete job, which stock would have let through, so its verdict is given a
    short moment more (a rank that arrived in the last moments of the timeout)."""
    slots = [check.key(epoch, "rank", r) for r in range(check.world_size)]
    if not check.store.check(slots):
        return None
    wait = timedelta(seconds=_VERDICT_IN_FLIGHT_SECONDS)
    return timed(check.store, wait, check.store.get, check.key(epoch, "verdict"))


def _with_context(error: BaseException, text: str) -> RuntimeError:
    """``error``'s own type (DistStoreError, DistNetworkError...) with ``text`` in
    front, so elastic agents and retry code that catch those types still do."""
    try:
        wrapped = type(error)(f"{text}: {error}")
    except Exception:  # a type that takes other arguments
        wrapped = RuntimeError(f"{text}: {error}")
    return wrapped if isinstance(wrapped, RuntimeError) else RuntimeError(f"{text}: {error}")


def exchange(
    store: dist.Store,
    family: Family,
    rank: int,
    world_size: int,
    timeout: timedelta,
    backend: str,
    mode: str,
    backend_key: Callable[[int], str] | None = None,
    name: str = "",
) -> tuple[Verdict, RankInfo]:
    """Run one check on ``store``; the store's own timeout is given back afterwards.

    Raises only for a broken store, with the store error's own type and what the
    check was doing.
    """
    info = local_info(rank, family, mode, name)  # raises on a bad override before any store traffic
    if world_size == 1:
        return judge(family, [info], backend), info
    check = Check(
        store, family, rank, world_size, Deadline(timeout), backend, info,
        info.to_payload(family, secrets.token_hex(8)), backend_key, _grace(timeout, world_size),
    )
    prefix = f"{family.title} check on rank {rank}"
    with borrowed_timeout(store):
        try:
            return (_coordinate(check) if rank == 0 else _await_verdict(check)), info
        except InvalidPayload as e:
            return Verdict("invalid", f"{family.title} check: rank 0 published {e}.", None), info
        except RuntimeError as e:  # the store failed, or timed out outside blocking()
            raise _with_context(e, f"{prefix}: the rendezvous store failed while {check.doing}") from e


def raise_on_failure(verdict: Verdict, info: RankInfo, family: Family) -> None:
    """Act on a verdict: raise what a failure means, log what a pass must say.

    A timeout raises ``DistStoreError``, as stock torch's own init timeouts do, so
    elastic agents and retry code that catch it still do; a mismatch or an
    invalid payload raises ``RuntimeError``, unless every checking rank runs
    ``warn``, which logs it instead.
    """
    if verdict.ok:
        if verdict.detail:
            logger.warning(verdict.detail)
        return
    message = _messages.error_message(verdict.detail, info, family)
    if verdict.status == "timeout":
        raise dist.DistStoreError(message)
    if verdict.status == "mismatch" and not verdict.enforce:
        logger.warning("%s\nEvery checking rank runs %s=warn: continuing anyway.", message, CHECK_MODE_ENV)
        return
    raise RuntimeError(message)
