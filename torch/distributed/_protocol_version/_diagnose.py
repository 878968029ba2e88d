"""The slow path: what a rank does once a wait has outlasted its grace period.

Nothing here runs while every rank arrives within the grace period. Past it, a
waiting rank looks at the store every quarter second (more often near its
deadline) with calls that never
block, and can tell from what it finds:

* which ranks never published (their slot is empty);
* which of those went ahead into building the backend without the check: a
  build without the guardrail, or one with the check off. Each gloo rank writes
  its own key under the default group's store prefix as soon as it starts
  building, so such a rank is seen within a poll. It is judged as protocol
  version 1, the wire of the torch this check was introduced on;
* which ranks are still waiting for rank 0 to open the check: a rank that waited
  past its grace period leaves a *presence mark* holding its payload.

The marks also let the waiting ranks judge without rank 0 when rank 0 itself
runs no check: each of them reads the same marks and keys and reaches the same
verdict. Costs grow with the number of silent ranks only: bisection with
``check`` finds ``m`` absent keys among ``n`` in O(m log n) calls.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch.distributed as dist
from torch.distributed._protocol_version import _messages
from torch.distributed._protocol_version._judge import judge_payloads
from torch.distributed._protocol_version._payload import Verdict
from torch.distributed._protocol_version._store import Check, find_present


# gloo's own key for a rank, under the device's prefix store (torch 2.13:
# ProcessGroupGloo's full-mesh rendezvous, context 0). A test asserts it against a
# real gloo group, so a torch that moves it fails loudly.
_GLOO_RANK_KEY = "0/{rank}"


# What stock torch asks before it builds each backend (distributed_c10d).
_AVAILABLE = {
    "gloo": dist.is_gloo_available,
    "nccl": dist.is_nccl_available,
    "mpi": dist.is_mpi_available,
    "ucc": dist.is_ucc_available,
    "xccl": dist.is_xccl_available,
}


def _device_backend_map(backend: str) -> dict[str, str] | None:
    """The device -> backend map stock torch builds for ``backend`` (its
    ``BackendConfig``), or None for a name it cannot read."""
    try:
        return dist.distributed_c10d.BackendConfig(dist.Backend(backend)).get_device_backend_map()
    except (ValueError, RuntimeError, AssertionError):
        return None


def backend_buildable(backend: str) -> bool:
    """Whether this build can make every backend ``backend`` names.

    When it cannot (an unknown name, NCCL in a CPU build), stock torch refuses at
    once in ``_new_process_group_helper``; the check then steps aside, because
    waiting here for peers that are late or absent would turn that instant error
    into a timeout. Backends registered by plugins are taken as buildable.
    """
    device_map = _device_backend_map(backend)
    if device_map is None:
        return False
    names = {str(name).lower() for name in device_map.values()}
    return all(_AVAILABLE[n]() if n in _AVAILABLE else n in dist.Backend._plugins for n in names)


def backend_key_for(backend: str, group_name: str) -> Callable[[int], str] | None:
    """Where the default group's backend marks a rank that started building it,
    relative to the store ``init_process_group`` hands the backend.

    ``_new_process_group_helper`` wraps that store as ``PrefixStore(f"{group_name}/")``
    and then ``PrefixStore(f"{device}/")``; a ``PrefixStore`` joins with ``/``.
    Only gloo writes a key per rank at once; NCCL's rank 0 writes one unique id,
    lazily, and its other ranks write nothing, so only gloo is probed.
    """
    device_map = _device_backend_map(backend)
    if device_map is None:
        return None
    devices = [device for device, name in device_map.items() if str(name) == "gloo"]
    if not devices:
        return None
    prefix = f"{group_name}//{devices[0]}//"
    return lambda rank: prefix + _GLOO_RANK_KEY.format(rank=rank)


def _absent(check: Check, keys: dict[int, str]) -> list[int]:
    """The ranks among ``keys`` whose key does not exist."""
    ranks = list(keys)
    present = set(find_present(check.store, list(keys.values())))
    return [rank for i, rank in enumerate(ranks) if i not in present]


def _went_ahead(check: Check, ranks: Sequence[int]) -> list[int]:
    """The ``ranks`` whose backend key exists: they run no check.

    A rank that published in the previous check on this store runs the check: its
    backend key is a leftover of that earlier group (``init_process_group`` after
    ``destroy_process_group`` on the same store), not a sign of a build without it.
    """
    if check.backend_key is None:
        return []
    found = [ranks[i] for i in find_present(check.store, [check.backend_key(r) for r in ranks])]
    if found and check.epoch > 1:
        earlier = set(find_present(check.store, [check.key(check.epoch - 1, "rank", r) for r in found]))
        found = [r for i, r in enumerate(found) if i not in earlier]
    return found


def _await_accounted(check: Check, keys: dict[int, str]) -> tuple[list[int], list[int]]:
    """Poll until each rank of ``keys`` has written its key or gone ahead without
    the check, or the deadline passes. Returns ``(went_ahead, missing)``."""
    pending = _absent(check, keys)
    went_ahead: list[int] = []
    while pending:
        went_ahead += _went_ahead(check, pending)
        pending = [r for r in pending if r not in went_ahead]
        if not pending or check.deadline.expired():
            break
        check.deadline.pause()
        pending = _absent(check, {r: keys[r] for r in pending})
    return sorted(went_ahead), pending


def await_payloads(check: Check, slots: Sequence[str]) -> tuple[list[int], list[int], list[int]]:
    """Rank 0, past its grace period: poll until every rank has published or gone
    ahead without the check, or the deadline passes.

    Returns ``(published, went_ahead, missing)``, ranks other than 0.
    """
    went_ahead, missing = _await_accounted(check, {r: slots[r] for r in range(1, check.world_size)})
    silent = set(missing) | set(went_ahead)
    published = [r for r in range(1, check.world_size) if r not in silent]
    return published, went_ahead, missing


def coordinator_timeout(
    check: Check, missing: Sequence[int], went_ahead: Sequence[int], epoch: int | None = None
) -> Verdict:
    """Rank 0's verdict when ranks did not publish within its timeout: those that
    left a presence mark in ``epoch`` came, waited for rank 0 and gave up before
    it opened the check; the others never arrived."""
    head = _messages.timeout_head(check.family, check.deadline.timeout, check.backend)
    gave_up: list[int] = []
    if epoch is not None:
        gave_up = [missing[i] for i in find_present(check.store, [check.key(epoch, "waiting", r) for r in missing])]
    never = [r for r in missing if r not in gave_up]
    lines = [f"{head}: {_messages.never_arrived(never, check.family)}." if never else f"{head}."]
    if gave_up:
        lines.append(
            f"{_messages.sentence(_messages.ranks_phrase(gave_up, 'was', 'were'))} waiting for rank 0 to "
            "open the check and reached their own timeout first (rank 0 came later than they did)."
        )
    if went_ahead:
        lines.append(
            f"Meanwhile {_messages.ranks_phrase(went_ahead, 'runs', 'run')} "
            f"{_messages.NO_CHECK_BUILD}."
        )
    return Verdict("timeout", "\n".join(lines), None)


def leave_mark(check: Check, epoch: int) -> None:
    """Say that this rank waits for rank 0 to open ``epoch``; the mark holds its payload."""
    check.store.set(check.key(epoch, "waiting", check.rank), check.payload)


def await_coordinator(check: Check, epoch: int, key: str) -> bytes | Verdict:
    """A rank other than 0, past its grace period and with its presence mark left
    (:func:`leave_mark`), waiting for rank 0 to open ``epoch`` (``key`` appears
    when it does).

    Polls. Returns ``key``'s value once it exists; a verdict reached without rank
    0 when rank 0 is seen building its backend without the check; or, at the
    deadline, a timeout that says who is waiting and who never arrived.
    """
    store = check.store
    while not check.deadline.expired():
        if store.check([key]):
            return store.get(key)
        if _went_ahead(check, [0]):
            return _judge_without_coordinator(check, epoch)
        check.deadline.pause()
    return _no_coordinator_timeout(check, epoch)


def _marks(check: Check, epoch: int) -> dict[int, str]:
    return {r: check.key(epoch, "waiting", r) for r in range(1, check.world_size)}


def _judge_without_coordinator(check: Check, epoch: int) -> Verdict:
    """Rank 0 runs no check: judge from the presence marks, as every waiting rank does.

    Every rank waits until each rank has either left a mark or gone ahead into the
    backend, and neither ever disappears, so all of them judge the same ranks.
    """
    marks = _marks(check, epoch)
    others, pending = _await_accounted(check, marks)
    went_ahead = [0, *others]
    if pending:
        return coordinator_timeout(check, pending, went_ahead)
    marked = [r for r in marks if r not in went_ahead]
    raws = check.store.multi_get([marks[r] for r in marked])
    return judge_payloads(check.family, dict(zip(marked, raws)), went_ahead, check.backend)


def _no_coordinator_timeout(check: Check, epoch: int) -> Verdict:
    """The deadline passed before rank 0 opened the check: say who is where."""
    missing = _absent(check, _marks(check, epoch))
    went_ahead = _went_ahead(check, missing)
    never = [r for r in missing if r not in went_ahead]
    waiting = [r for r in range(1, check.world_size) if r not in missing]
    head = _messages.timeout_head(check.family, check.deadline.timeout, check.backend)
    lines = [
        f"{head}: rank 0, which collects every rank's version, has not opened the check; "
        f"{_messages.ranks_phrase(waiting, 'is', 'are')} waiting for it."
    ]
    if never:
        lines.append(_messages.sentence(f"{_messages.never_arrived(never, check.family)}."))
    if went_ahead:
        lines.append(
            _messages.sentence(f"{_messages.ranks_phrase(went_ahead, 'runs', 'run')} {_messages.NO_CHECK_BUILD}.")
        )
    return Verdict("timeout", "\n".join(lines), None)


def verdict_timeout(check: Check, epoch: int) -> Verdict:
    """A rank other than 0 reached its deadline in an open epoch: name the ranks
    rank 0 is still waiting for."""
    missing = _absent(check, {r: check.key(epoch, "rank", r) for r in range(check.world_size)})
    went_ahead = _went_ahead(check, missing)
    never = [r for r in missing if r not in went_ahead]
    head = _messages.timeout_head(check.family, check.deadline.timeout, check.backend)
    if never:
        them = "it" if len(never) == 1 else "them"
        text = (
            f"{_messages.never_arrived(never, check.family)}; rank 0 opened the check but has not "
            f"delivered the verdict, which waits for {them}."
        )
    else:
        text = (
            "every rank has published its version, but rank 0, which collects them, "
            "has not delivered the verdict."
        )
    return Verdict("timeout", f"{head} on rank {check.rank}: {text}", None)
