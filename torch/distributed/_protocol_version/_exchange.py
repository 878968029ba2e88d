"""The store protocol of one check, under ``<family prefix>/<namespace>/``: every rank
publishes its payload (``rank/<r>``); rank 0 blocks until every other one is there, marks
them judged and publishes the ``verdict``; each other rank blocks on the verdict, takes it if
its own payload was marked, deletes it and counts itself out (``read``): the last removes the
keys. Rank 0 holds the store for a failing verdict (the preflight's: any), until the last sets
``left``. A rank without the check is seen only through
its backend's trace (gloo's key per rank, torchrun's role info, RPC's gloo key); without it
``error`` waits for a rank until its timeout, ``warn`` for its grace period unless every rank
is known to check (``expected``) or it is the preflight (``patient``). A rank with an invalid
setting publishes it in its slot (rank 0: and the verdict on it) before it raises."""

import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist
from torch._C._distributed_c10d import Store
from torch.distributed._protocol_version import _messages
from torch.distributed._protocol_version._families import Family
from torch.distributed._protocol_version._judge import joined, judge, judge_payloads
from torch.distributed._protocol_version._payload import (
    InvalidPayload, is_setting, local_info, RankInfo, setting_payload, Verdict,
)
from torch.distributed._protocol_version._settings import CHECK_MODE_ENV, check_mode, SettingError, version_range
from torch.distributed._protocol_version._store import (
    count, delete, find_present, present, wait_for, watching,
)


__all__ = ["NO_CHECK", "Outcome", "ProtocolVersionError", "exchange", "mode_or_tell", "raise_on_failure"]

logger = logging.getLogger(__name__)

# A warn rank's wait for ranks it has no evidence about, and the delay before the
# watcher looks for ranks without the check: min(1 s, timeout / 10).
_GRACE_SECONDS = 1.0
# What the watcher writes for a rank whose backend started without the check (its
# payload), and for rank 0 in that case (the verdict: the others judge alone).
NO_CHECK = '{"no_check": true}'
NO_COORDINATOR = '{"no_coordinator": true}'
JUDGED = '{"judged": true}'  # what rank 0 puts in the slots it judged: the verdict is theirs
REUSED = "reused"  # what a rank tells rank 0 in place of "left" when the verdict judged no payload of its own


class ProtocolVersionError(dist.DistError):
    """The ranks run builds that cannot talk to each other, or one published garbage."""


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One rank's verdict and payload, and the payloads it judged (rank 0)."""

    verdict: Verdict
    info: RankInfo
    judged: dict[int, bytes] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Check:
    store: Store
    family: Family
    namespace: str
    rank: int
    world_size: int
    timeout: timedelta  # counted from this rank's arrival, as the store counts its own waits
    end: float  # time.monotonic() at the end of the timeout
    grace: float
    bounded: bool  # a warn rank without evidence: it waits its grace period for ranks not heard from
    patient: bool  # the preflight's roll call: wait up to the timeout on warn too, and hold the store as long
    backend: str
    info: RankInfo
    payload: str
    trace: Callable[[int], str] | None  # where a rank's backend leaves a key when it starts, if it does
    doing: str = "publishing this rank's version"  # for the message, should the store fail

    def key(self, *parts: object) -> str:
        return self.family.key(self.namespace, *parts)

    def slot(self, rank: int) -> str:
        return self.key("rank", rank)

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def holds(self, verdict: Verdict) -> bool:
        """Whether rank 0 waits for ``left`` before it goes on: on a pass it goes on into the backend, which
        keeps the store up; else it may exit, and take the store down with it."""
        return self.patient or not verdict.ok

    def reused_verdict(self) -> Verdict:
        return Verdict("timeout", _messages.reused(self.family, self.key(), self.backend), None)


def _collect(check: _Check, ranks: list[int]) -> tuple[dict[int, bytes], list[int]]:
    """Block until every rank of ``ranks`` published or was seen without the check: the payloads, and who is missing."""
    store, slots, trace = check.store, [check.slot(r) for r in ranks], check.trace
    check.doing = "collecting payloads"

    def fill_traced(clone: Store) -> bool:  # the watcher's look: O(m log n) for m ranks absent
        found = set(find_present(clone, slots))
        absent = [r for i, r in enumerate(ranks) if i not in found]
        for i in find_present(clone, [trace(r) for r in absent]) if trace else ():
            clone.set(check.slot(absent[i]), NO_CHECK)
        return False

    seconds = min(check.grace, check.remaining()) if check.bounded else check.remaining()
    with watching(store, check.grace, fill_traced if trace else None):
        complete = wait_for(store, slots, seconds)
    found = [ranks[i] for i in (range(len(ranks)) if complete else find_present(store, slots))]
    raws = dict(zip(found, store.multi_get([check.slot(r) for r in found]) if found else []))
    return raws, [r for r in ranks if r not in raws]


def _verdict_on(check: _Check, raws: dict[int, bytes], missing: list[int]) -> Verdict:
    """The verdict on the ranks collected: a timeout, unless a warn rank judges without the missing ones."""
    payloads, traceless = {r: raw for r, raw in raws.items() if raw != NO_CHECK.encode()}, check.trace is None
    if missing and not check.bounded:
        head = _messages.timeout_head(check.family, check.timeout, check.backend)
        detail = f"{head}: {_messages.never_arrived(missing, check.family, traceless)}."
        return Verdict("timeout", detail, None, without=tuple(missing))
    verdict = judge_payloads(check.family, payloads, [r for r in raws if r not in payloads], check.backend)
    unheard = _messages.unaccounted(check.family, missing, check.grace, check.backend, traceless) if missing else ""
    detail = "\n".join(filter(None, [verdict.detail, unheard]))
    return dataclasses.replace(verdict, detail=detail, without=tuple(missing))


def _coordinate(check: _Check) -> Outcome:
    """Rank 0: collect, judge, publish, and hold the store (it often hosts it) while the readers of a
    failing verdict read, for its grace period at most. Its own payload there means a reused namespace."""
    store, verdict_key = check.store, check.key("verdict")
    if present(store, [check.slot(0)]):
        verdict = check.reused_verdict()
        store.set(verdict_key, verdict.to_json())
        return Outcome(verdict, check.info)
    store.set(check.slot(0), check.payload)
    raws, missing = _collect(check, list(range(1, check.world_size)))
    raws[0] = check.payload.encode()
    # The ranks that will read the verdict: not those seen without the check, nor those that raised on a setting.
    reading = [r for r, raw in raws.items() if r != 0 and raw != NO_CHECK.encode() and not is_setting(raw)]
    verdict = _verdict_on(check, raws, missing)
    verdict = dataclasses.replace(verdict, readers=len(reading), token=secrets.token_hex(8))
    check.doing = "publishing the verdict"
    delete(store, [check.slot(r) for r in raws.keys() - {0, *reading}])
    readers = [check.slot(r) for r in reading]
    if readers:
        store.multi_set(readers, [JUDGED] * len(readers))  # type: ignore[attr-defined]  # the stub lacks it
    store.set(verdict_key, verdict.to_json())
    check.doing = "waiting for the others to read the verdict"
    hold = check.remaining() if check.patient else min(check.grace, check.remaining())
    if not readers and not verdict.without:
        delete(store, [verdict_key, check.slot(0)])
    elif readers and check.holds(verdict) and wait_for(store, [check.key("left")], hold):
        reused = store.get(check.key("left")) == REUSED.encode()
        delete(store, [check.key("left")])
        if reused:  # it judged payloads an earlier attempt left, which its own ranks overwrote
            return Outcome(check.reused_verdict(), check.info)
    return Outcome(verdict, check.info, raws)


def _leave(check: _Check, verdict: Verdict) -> Verdict:
    """Any rank but 0, having read ``verdict``: count itself out; the last reader removes the keys
    (unless late ranks may come) and releases a holding rank 0. A verdict that did not judge this rank's
    payload is a late rank's, or an earlier check's in a reused namespace."""
    told = verdict.status == "invalid" and not verdict.token  # rank 0's on its own setting: every rank's, unmarked
    store, check.doing = check.store, "reading its own slot"
    judged = told or (present(store, [check.slot(check.rank)]) and store.get(check.slot(check.rank)) == JUDGED.encode())
    delete(store, [check.slot(check.rank)])
    if not judged:  # a late rank's keys stay: others the verdict was reached without may still come
        if check.rank in verdict.without:
            return dataclasses.replace(_late(check, verdict), token=verdict.token)
        if check.holds(verdict):  # rank 0 of this attempt, if it judged an earlier one's payloads
            store.set(check.key("left"), REUSED)
        return check.reused_verdict()
    if count(store, check.key("read"), 1) == verdict.readers:
        if not verdict.without:
            delete(store, [check.key("verdict"), check.key("read"), check.slot(0)])
        if check.holds(verdict) and not told:  # a rank 0 that told its setting is gone
            store.set(check.key("left"), "")  # after the deletes: rank 0 may take the store down
    return verdict


def _late(check: _Check, verdict: Verdict) -> Verdict:
    """This rank came after rank 0 reached ``verdict`` without it."""
    family, info, negotiated = check.family, check.info, verdict.negotiated
    came = f"rank {check.rank} arrived after rank 0 had reached its verdict without it"
    if verdict.status == "timeout":
        detail = _messages.late_timeout(family, check.backend, came, check.key(), verdict.detail)
        return Verdict("timeout", detail, None)
    if negotiated is None:
        detail = f"{came}; the ranks judged cannot talk to each other:\n{verdict.detail}"
        return Verdict("mismatch", detail, None, info.mode == "error" or verdict.enforce)
    outcome = joined(family, info, check.backend, came, negotiated, verdict.enforce)
    text = f"{came}; it speaks {family.version_word} {negotiated}, which the others negotiated, and goes on."
    detail = f"{_messages.check_head(family, check.backend)}: {text}"
    return dataclasses.replace(outcome, detail=detail, without=verdict.without) if outcome.ok else outcome


def _participate(check: _Check) -> Outcome:
    """Any rank but 0: await rank 0's verdict (on ``warn`` without evidence, rank 0 for the grace
    period only). Where rank 0's backend started without a payload, the others judge alone."""
    store, verdict_key, trace = check.store, check.key("verdict"), check.trace
    check.doing = "waiting for rank 0"
    if check.bounded and not wait_for(store, [check.slot(0)], min(check.grace, check.remaining())):
        count(store, check.key("read"), 1)  # rank 0 may still judge its payload: it will not read the verdict
        return Outcome(_verdict_on(check, {check.rank: check.payload.encode()}, [0]), check.info)

    def relay_no_coordinator(clone: Store) -> bool:  # the watcher's look; True: done looking
        if present(clone, [check.slot(0)]):  # rank 0 checks: its verdict will come
            return True
        if trace is None or not present(clone, [trace(0)]):
            return False
        clone.compare_set(verdict_key, "", NO_COORDINATOR)
        return True

    check.doing = "waiting for the verdict"
    with watching(store, check.grace, relay_no_coordinator if trace else None):
        arrived = wait_for(store, [verdict_key], check.remaining())
        if not arrived and check.patient and present(store, [check.slot(0)]):  # rank 0 is still at its roll call,
            arrived = wait_for(store, [verdict_key], check.timeout.total_seconds())  # which ends within its timeout
    # The slots before the verdict: a reader deletes its slot only once the verdict is there.
    found = set() if arrived else set(find_present(store, [check.slot(r) for r in range(check.world_size)]))
    if not arrived and not present(store, [verdict_key]):  # else rank 0's own account has just come
        missing = [r for r in range(check.world_size) if r not in found]
        head = _messages.timeout_head(check.family, check.timeout, check.backend)
        text = _messages.no_verdict(check.family, check.rank, missing, trace is None)
        return Outcome(Verdict("timeout", f"{head}: {text}.", None), check.info)
    raw = store.get(verdict_key)
    if raw == NO_COORDINATOR.encode():
        raws, missing = _collect(check, list(range(1, check.world_size)))
        return Outcome(_verdict_on(check, {**raws, 0: NO_CHECK.encode()}, missing), check.info, raws)
    return Outcome(_leave(check, Verdict.from_json(verdict_key, raw)), check.info)


def mode_or_tell(store: Store, family: Family, namespace: str, rank: int, world_size: int, backend: str) -> str | None:
    """This rank's mode for a check of ``family`` under ``namespace``, ``None`` when off. An invalid setting is
    published in this rank's slot before it is raised, and by rank 0 as the verdict on it too, so that the others
    fail at once naming it rather than at their timeout."""
    try:
        mode, _ = check_mode(), version_range(family)  # an invalid setting is an error in every mode
    except SettingError as e:
        if world_size > 1:
            payload = setting_payload(str(e))
            told = {family.key(namespace, "rank", rank): payload}
            if rank == 0:  # read by every other rank, the last of which removes it
                verdict = judge_payloads(family, {0: payload.encode()}, [], backend)
                told[family.key(namespace, "verdict")] = dataclasses.replace(verdict, readers=world_size - 1).to_json()
            with contextlib.suppress(RuntimeError):  # a store failure must not hide the setting
                store.multi_set(list(told), list(told.values()))  # type: ignore[attr-defined]  # the stub lacks it
        raise
    return None if mode == "off" else mode


def exchange(
    store: Store, family: Family, rank: int, world_size: int, timeout: timedelta, backend: str, mode: str,
    namespace: str, trace: Callable[[int], str] | None = None, name: str = "", patient: bool = False,
    expected: bool = False,
) -> Outcome:
    """Run one check of ``family`` as ``rank`` in ``mode`` (``error`` or ``warn``) under ``namespace``, the same
    on every rank of one attempt and never used twice on a store. ``trace(r)`` is where rank ``r``'s backend
    writes a key as it starts; ``expected``: every rank is known to run the check, so ``warn`` waits as ``error``
    does; ``patient`` waits so too, and a rank but 0 once more for a rank 0 still at it (the preflight's roll call).
    Raises ``SettingError`` on a bad override before any store traffic, and a store failure as its own type."""
    info = local_info(rank, family, mode, name)
    payload = info.to_payload(family)
    if world_size == 1:
        return Outcome(judge(family, [info], backend), info, {0: payload.encode()})
    grace = min(_GRACE_SECONDS, timeout.total_seconds() / 10)
    bounded = mode == "warn" and not (patient or expected) and trace is None
    end = time.monotonic() + timeout.total_seconds()
    check = _Check(store, family, namespace, rank, world_size, timeout, end, grace, bounded, patient, backend, info,
                   payload, trace)
    try:
        if rank == 0:
            return _coordinate(check)
        store.set(check.slot(rank), payload)
        return _participate(check)
    except InvalidPayload as e:
        return Outcome(Verdict("invalid", f"{_messages.check_head(family, backend)}: {e}.", None), info)
    except RuntimeError as e:  # the store failed: its own type (DistStoreError...), so retry code still catches it
        text = f"{family.title} check on rank {rank}: the store failed while {check.doing}"
        raise (type(e)(f"{text}: {e}") if isinstance(e, dist.DistError) else RuntimeError(f"{text}: {e}")) from e


def raise_on_failure(verdict: Verdict, info: RankInfo, family: Family) -> None:
    """Raise what a failing verdict means: ``DistStoreError`` for a timeout, as the store's own waits do,
    unless this rank runs ``warn``; else ``ProtocolVersionError``, unless every checking rank runs ``warn``."""
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
