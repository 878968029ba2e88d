"""Who is where: ranks that never published, went ahead without the check, or came late.

Gloo writes a key per rank as soon as it starts building, so a rank that runs no
check (a build without it, or the check off) is seen once a waiting rank looks,
past its grace period, and is judged as protocol version 1; a key left by a rank
that took part in the last check on this store belongs to that earlier group.
Ranks that wait for rank 0 leave a *mark* holding their payload (``waiting``, or
``went_on`` for a ``warn`` rank that stopped waiting), from which a late rank 0,
or all of them when rank 0 runs no check, judge them. Costs grow with the number
of silent ranks only: bisection finds them in O(m log n) looks.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from torch.distributed._protocol_version import _messages
from torch.distributed._protocol_version._judge import judge_payloads
from torch.distributed._protocol_version._payload import Verdict
from torch.distributed._protocol_version._store import Check, find_present, present, wait_for


def gloo_key(group_name: str, device: str) -> Callable[[int], str]:
    """Where ``ProcessGroupGloo`` marks a rank that started building it, relative to
    the store ``_new_process_group_helper`` wraps as ``PrefixStore(f"{group_name}/")``
    and ``PrefixStore(f"{device}/")``; a test asserts it against real gloo."""
    return lambda rank: f"{group_name}//{device}//0/{rank}"


def _absent(check: Check, keys: dict[int, str]) -> list[int]:
    """The ranks among ``keys`` whose key does not exist."""
    found = set(find_present(check.store, list(keys.values())))
    return [rank for i, rank in enumerate(keys) if i not in found]


def went_ahead(check: Check, ranks: Sequence[int], previous: str | None) -> list[int]:
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
    """Look until each rank of ``keys`` has written its key or gone ahead without
    the check, or until the deadline. Returns ``(went_ahead, missing)``."""
    pending, ahead = list(keys), []
    while not present(check.store, [keys[r] for r in pending]):
        pending = _absent(check, {r: keys[r] for r in pending})
        ahead += went_ahead(check, pending, previous)
        pending = [r for r in pending if r not in ahead]
        if not pending or check.deadline.expired():
            return sorted(ahead), pending
        check.deadline.pause()
    return sorted(ahead), []


def _timeout(check: Check, never: Sequence[int], ahead: Sequence[int], where: str = "", first: str = "") -> Verdict:
    """A timeout verdict: ``first``, who never published, who runs no check."""
    head = _messages.timeout_head(check.family, check.deadline.timeout, check.backend, check.bounded) + where
    never_text = _messages.never_arrived(never, check.family, check.backend_key is None) if never else ""
    lines = [f"{head}: {'; '.join(part for part in (first, never_text) if part)}."]
    if ahead:
        lines.append(f"Meanwhile {_messages.ranks_phrase(ahead, 'runs', 'run')} {_messages.NO_CHECK_BUILD}.")
    return Verdict("timeout", "\n".join(lines), None)


def collect(check: Check, previous: str | None) -> tuple[Verdict, list[int]]:
    """Rank 0: the verdict once every rank published or went ahead without the
    check, or a timeout; and the ranks that published (they wait to read it)."""
    slots = {r: check.key(check.token, "rank", r) for r in range(check.world_size)}
    others = {r: slots[r] for r in range(1, check.world_size)}
    ahead, missing, gone_on = [], [], {}
    if not wait_for(check.store, list(others.values()), min(check.grace, check.deadline.remaining())):
        gone_on = _gone_on(check, list(others), previous)
        ahead, missing = _await_accounted(check, {r: k for r, k in others.items() if r not in gone_on}, previous)
    published = [r for r in range(1, check.world_size) if r not in ahead and r not in missing and r not in gone_on]
    raws = dict(zip([0, *published], check.store.multi_get([slots[r] for r in [0, *published]])))
    return _judge_accounted(check, {**raws, **gone_on}, ahead, missing), published


def _gone_on(check: Check, ranks: Sequence[int], previous: str | None) -> dict[int, bytes]:
    """The payloads that ``warn`` ranks among ``ranks`` left when they went on
    before rank 0 opened the check (``error`` ranks wait, and publish)."""
    marks = _marks(check, previous, "went_on")
    found = [ranks[i] for i in find_present(check.store, [marks[r] for r in ranks])]
    return dict(zip(found, check.store.multi_get([marks[r] for r in found]))) if found else {}


def _judge_accounted(check: Check, raws: dict[int, bytes], ahead: Sequence[int], missing: Sequence[int]) -> Verdict:
    """Judge the ranks accounted for. Ranks still ``missing`` time an ``error``
    rank's check out; a ``warn`` rank judges without them and names them."""
    if missing and not check.bounded:
        return _timeout(check, missing, ahead)
    verdict = judge_payloads(check.family, raws, ahead, check.backend)
    if not missing:
        return verdict
    unheard = _messages.unaccounted(check.family, missing, check.grace, check.backend, check.backend_key is None)
    return dataclasses.replace(verdict, detail="\n".join(filter(None, [verdict.detail, unheard])), partial=True)


def _marks(check: Check, closed: str | None, kind: str = "waiting") -> dict[int, str]:
    return {r: check.key(closed or "first", kind, r) for r in range(1, check.world_size)}


def leave_mark(check: Check, closed: str | None, kind: str = "waiting") -> None:
    """Say that this rank waits for rank 0 to open the check after ``closed``
    (``went_on``: that it went on without waiting, in ``warn``)."""
    check.store.set(_marks(check, closed, kind)[check.rank], check.payload)


def judge_without_coordinator(check: Check, closed: str | None) -> Verdict:
    """Rank 0 runs no check: every waiting rank waits until each rank has left a
    mark or gone ahead (neither disappears), so all judge the same ranks."""
    marks = _marks(check, closed)
    others, pending = _await_accounted(check, marks, closed)
    marked = [r for r in marks if r not in others and r not in pending]
    raws = check.store.multi_get([marks[r] for r in marked])
    return _judge_accounted(check, dict(zip(marked, raws)), [0, *others], pending)


def open_timeout(check: Check, closed: str | None) -> Verdict:
    """A rank other than 0 reached its deadline before rank 0 opened a check."""
    late = "the last check on this store closed before this rank arrived (late, or that check was an earlier group's), and " if closed else ""
    text = f"{late}rank 0, which collects every rank's version, has not opened {'a new' if closed else 'the'} check"
    if check.bounded:
        leave_mark(check, closed, "went_on")
        return _timeout(check, [], [], first=f"{text}; this rank left its version for rank 0 to judge")
    marks = _marks(check, closed)
    missing = _absent(check, marks)
    ahead = went_ahead(check, missing, closed)
    waiting = [r for r in marks if r not in missing]
    text += f"; {_messages.ranks_phrase(waiting, 'is', 'are')} waiting for it"
    return _timeout(check, [r for r in missing if r not in ahead], ahead, first=text)


def judge_late(check: Check, closed: str) -> Verdict | None:
    """This rank finds check ``closed`` judged without it by a ``warn`` rank 0: it
    came late. It goes on if it speaks the version the others negotiated; ``None``
    when that check did not leave this rank out (an earlier group's, or taken)."""
    store, key, info = check.store, check.key, check.info
    verdict_key, taken = key(closed, "verdict"), key(closed, "late", check.rank)
    verdict = Verdict.from_json(verdict_key, store.get(verdict_key))  # written with "closed"
    if not verdict.partial or find_present(store, [key(closed, "rank", check.rank), taken]):
        return None
    store.set(taken, check.payload)  # a rank of a later group on this store waits for its own check
    negotiated = verdict.negotiated
    came = f"rank {check.rank} arrived after rank 0 had judged the check without it"
    if negotiated is None:  # the ranks judged already mismatched
        detail = f"{came}; the ranks judged cannot talk to each other:\n{verdict.detail}"
        return Verdict("mismatch", detail, None, info.mode == "error" or verdict.enforce)
    if not info.min_version <= negotiated <= info.version:
        detail = _messages.late_mismatch(check.family, check.backend, came, negotiated)
        return Verdict("mismatch", detail, None, info.mode == "error")
    text = f"{check.family.title} check ({_messages.backend_text(check.backend)}): {came}; it speaks {check.family.version_word} {negotiated}, which the others negotiated, and goes on."
    return Verdict("ok", text, negotiated, partial=True)


def verdict_timeout(check: Check, token: str) -> Verdict:
    """A rank other than 0 that published in check ``token`` reached its deadline."""
    missing = _absent(check, {r: check.key(token, "rank", r) for r in range(check.world_size)})
    if missing:
        text = f"rank 0 opened the check but has not delivered the verdict, which waits for {'it' if len(missing) == 1 else 'them'}"
    else:
        text = "every rank has published its version, but rank 0, which collects them, has not delivered the verdict"
    return _timeout(check, missing, [], f" on rank {check.rank}", text)
