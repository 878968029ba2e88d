"""The slow path: what a rank does once a wait has outlasted its grace period.

Nothing here runs while every rank arrives within the grace period. Past it, a
waiting rank looks at the store every quarter second (more often near its
deadline) with presence tests that never block, and can tell:

* which ranks never published (their slot is empty);
* which of those went ahead into building the backend without the check: a
  build without the guardrail, or one with the check off. Each gloo rank writes
  its own key as soon as it starts building, so such a rank is seen within a
  poll, and judged as protocol version 1, the wire of the torch this check was
  introduced on. A key left by a rank that took part in the last check on this
  store belongs to that earlier group and is not taken for one;
* which ranks wait for rank 0 to open a check: each leaves a *mark* holding its
  payload, so that when rank 0 itself runs no check the waiting ranks judge from
  the same marks and keys and all reach the same verdict.

Costs grow with the number of silent ranks only: bisection finds ``m`` absent
keys among ``n`` in O(m log n) presence tests.
"""

from __future__ import annotations

from typing import Callable, Sequence

from torch.distributed._protocol_version import _messages
from torch.distributed._protocol_version._judge import judge_payloads
from torch.distributed._protocol_version._payload import Verdict
from torch.distributed._protocol_version._store import Check, find_present, present


def gloo_key(group_name: str, device: str) -> Callable[[int], str]:
    """Where ``ProcessGroupGloo`` marks a rank that started building it, relative
    to the store ``_new_process_group_helper`` receives: that function wraps the
    store as ``PrefixStore(f"{group_name}/")``, then ``PrefixStore(f"{device}/")``
    (a ``PrefixStore`` joins with ``/``), and gloo's full-mesh rendezvous writes
    ``0/<rank>`` there. A test asserts it against a real gloo group."""
    return lambda rank: f"{group_name}//{device}//0/{rank}"


def _absent(check: Check, keys: dict[int, str]) -> list[int]:
    """The ranks among ``keys`` whose key does not exist."""
    found = set(find_present(check.store, list(keys.values())))
    return [rank for i, rank in enumerate(keys) if i not in found]


def _went_ahead(check: Check, ranks: Sequence[int], previous: str | None) -> list[int]:
    """The ``ranks`` whose backend key exists and that took no part in the
    check ``previous`` (whose group may have left that key)."""
    if check.backend_key is None or not ranks:
        return []
    found = [ranks[i] for i in find_present(check.store, [check.backend_key(r) for r in ranks])]
    if previous is None or not found:
        return found
    earlier = set(find_present(check.store, [check.key(previous, "rank", r) for r in found]))
    return [r for i, r in enumerate(found) if i not in earlier]


def _await_accounted(check: Check, keys: dict[int, str], previous: str | None) -> tuple[list[int], list[int]]:
    """Poll until each rank of ``keys`` has written its key or gone ahead without
    the check, or the deadline passes. Returns ``(went_ahead, missing)``."""
    pending = _absent(check, keys)
    went_ahead: list[int] = []
    while pending:
        went_ahead += _went_ahead(check, pending, previous)
        pending = [r for r in pending if r not in went_ahead]
        if not pending or check.deadline.expired():
            break
        check.deadline.pause()
        pending = _absent(check, {r: keys[r] for r in pending})
    return sorted(went_ahead), pending


def _timeout(
    check: Check, never: Sequence[int], went_ahead: Sequence[int], where: str = "", first: str = ""
) -> Verdict:
    """A timeout verdict: ``first``, who never published, who runs no check."""
    head = _messages.timeout_head(check.family, check.deadline.timeout, check.backend) + where
    never_text = _messages.never_arrived(never, check.family) if never else ""
    lines = [f"{head}: {'; '.join(part for part in (first, never_text) if part)}."]
    if went_ahead:
        lines.append(_messages.sentence(
            f"{_messages.ranks_phrase(went_ahead, 'runs', 'run')} {_messages.NO_CHECK_BUILD}."
        ))
    return Verdict("timeout", "\n".join(lines), None)


def collect(check: Check, slots: Sequence[str], previous: str | None) -> tuple[Verdict, list[int]]:
    """Rank 0, past its grace period: wait until every rank has published or gone
    ahead without the check, then judge; or time out naming the others.

    Returns the verdict and the ranks that published (they wait to read it).
    """
    went_ahead, missing = _await_accounted(check, {r: slots[r] for r in range(1, check.world_size)}, previous)
    silent = set(went_ahead) | set(missing)
    published = [r for r in range(1, check.world_size) if r not in silent]
    if missing:
        return _timeout(check, missing, went_ahead), published
    raws = dict(zip([0, *published], check.store.multi_get([slots[r] for r in [0, *published]])))
    return judge_payloads(check.family, raws, went_ahead, check.backend), published


def _marks(check: Check, closed: str | None) -> dict[int, str]:
    return {r: check.key(closed or "first", "waiting", r) for r in range(1, check.world_size)}


def await_open(check: Check, announce: str, closed: str | None) -> Verdict | None:
    """A rank other than 0, waiting for rank 0 to open a check (``announce``
    appears when it does; ``closed`` is the last check, over before this rank
    could take part, or ``None``).

    Returns ``None`` once ``announce`` exists; a verdict reached without rank 0
    when rank 0 is seen building its backend without the check; or, at the
    deadline, a timeout that says who is waiting and who never arrived.
    """
    marks = _marks(check, closed)
    check.store.set(marks[check.rank], check.payload)
    while not check.deadline.expired():
        if present(check.store, [announce]):
            return None
        if _went_ahead(check, [0], closed):
            return _judge_without_coordinator(check, marks, closed)
        check.deadline.pause()
    missing = _absent(check, marks)
    went_ahead = _went_ahead(check, missing, closed)
    waiting = [r for r in marks if r not in missing]
    new = "a new check" if closed else "the check"
    text = (
        f"rank 0, which collects every rank's version, has not opened {new}; "
        f"{_messages.ranks_phrase(waiting, 'is', 'are')} waiting for it"
    )
    return _timeout(check, [r for r in missing if r not in went_ahead], went_ahead, first=text)


def _judge_without_coordinator(check: Check, marks: dict[int, str], closed: str | None) -> Verdict:
    """Rank 0 runs no check: judge from the marks, as every waiting rank does.

    Every rank waits until each rank has either left a mark or gone ahead into the
    backend, and neither ever disappears, so all of them judge the same ranks.
    """
    others, pending = _await_accounted(check, marks, closed)
    went_ahead = [0, *others]
    if pending:
        return _timeout(check, pending, went_ahead)
    marked = [r for r in marks if r not in went_ahead]
    raws = check.store.multi_get([marks[r] for r in marked])
    return judge_payloads(check.family, dict(zip(marked, raws)), went_ahead, check.backend)


def await_verdict(check: Check, token: str) -> bytes | Verdict | None:
    """A rank other than 0 that published in check ``token``, waiting for its verdict.

    Returns the verdict's bytes; ``None`` when a new rank 0 opened the next check
    instead (this one's died before judging); or, at the deadline, a timeout
    naming the ranks rank 0 is still waiting for.
    """
    verdict, following = check.key(token, "verdict"), check.key(token, "next")
    while not check.deadline.expired():
        if present(check.store, [verdict]):
            return check.store.get(verdict)
        if present(check.store, [following]):
            return None
        check.deadline.pause()
    missing = _absent(check, {r: check.key(token, "rank", r) for r in range(check.world_size)})
    where = f" on rank {check.rank}"
    if missing:
        them = "it" if len(missing) == 1 else "them"
        return _timeout(check, missing, [], where, f"rank 0 opened the check but has not delivered the verdict, which waits for {them}")
    text = "every rank has published its version, but rank 0, which collects them, has not delivered the verdict"
    return _timeout(check, [], [], where, text)
