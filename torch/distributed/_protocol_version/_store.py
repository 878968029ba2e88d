"""Store plumbing shared by the exchange and its slow path: one check's context,
its deadline, bounded blocking calls, key names and presence searches."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence

import torch.distributed as dist
from torch.distributed._protocol_version._families import Family
from torch.distributed._protocol_version._payload import RankInfo


# Store timeouts are whole milliseconds and some stores read 0 as "forever", and a
# TCPStore logs two warning lines per timed-out call: never call with less left.
MIN_CALL_SECONDS = 0.05
# How often the slow path looks at the store again (check calls, which never block);
# more often as the deadline nears, so that a rank arriving in the last moments of
# the timeout is seen in time, as stock's own blocking waits would see it.
POLL_SECONDS = 0.25
_MIN_POLL_SECONDS = 0.02


class Deadline:
    """One check's timeout, counted from this rank's arrival, as stock counts it."""

    def __init__(self, timeout: timedelta) -> None:
        self.timeout = timeout
        self._end = time.monotonic() + timeout.total_seconds()

    def remaining(self) -> float:
        return self._end - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() < MIN_CALL_SECONDS

    def pause(self) -> None:
        """Sleep one poll interval of the slow path."""
        time.sleep(min(POLL_SECONDS, max(self.remaining() / 8, _MIN_POLL_SECONDS)))

    def bounded(self, cap: float) -> timedelta:
        """The timeout for one blocking call: ``cap`` seconds, never past the deadline."""
        return timedelta(seconds=max(min(cap, self.remaining()), MIN_CALL_SECONDS))


@dataclass
class Check:
    """Everything one rank's check needs; built once, passed down."""

    store: dist.Store
    family: Family
    rank: int
    world_size: int
    deadline: Deadline
    backend: str
    info: RankInfo
    payload: str
    # The key a rank's backend writes as soon as it starts building, or None
    # when the backend writes none we know of (see _diagnose.backend_key_for).
    backend_key: Callable[[int], str] | None
    grace: float  # how long a wait blocks before the slow path starts
    # What the check is doing, for the message should the store fail meanwhile.
    doing: str = "starting"
    # The epoch this rank takes part in, once known (0 before).
    epoch: int = 0

    def key(self, *parts: object) -> str:
        return self.family.key(*parts)


def is_timeout(error: RuntimeError) -> bool:
    if isinstance(error, dist.DistNetworkError):
        return False
    # TCPStore and HashStore raise DistStoreError; FileStore a RuntimeError that says so.
    return isinstance(error, dist.DistStoreError) or "timeout" in str(error).lower()


def timed(store: dist.Store, timeout: timedelta, fn: Callable[..., Any], *args: Any) -> Any:
    """Run one blocking call of ``store`` for at most ``timeout``; ``None`` when it
    timed out. Any other store error propagates."""
    store.set_timeout(timeout)
    try:
        return fn(*args)
    except RuntimeError as e:
        if is_timeout(e):
            return None
        raise


def blocking(check: Check, cap: float, fn: Callable[..., Any], *args: Any) -> Any:
    """:func:`timed` for at most ``cap`` seconds, never past the check's deadline."""
    return timed(check.store, check.deadline.bounded(cap), fn, *args)


def find_present(store: dist.Store, keys: Sequence[str]) -> list[int]:
    """Indices of the ``keys`` that exist, by bisection with ``check``.

    ``check`` of a list answers "are all there?" in one round trip, so a list in
    which ``m`` keys differ from the rest costs O(m log n) calls instead of n.
    """
    if not keys:
        return []
    if store.check(list(keys)):
        return list(range(len(keys)))
    if len(keys) == 1:
        return []
    middle = len(keys) // 2
    return find_present(store, keys[:middle]) + [
        middle + i for i in find_present(store, keys[middle:])
    ]


_timeouts_lock = threading.Lock()
# id(root store) -> [root store, its timeout before any check borrowed it, borrowers]
_borrowed: dict[int, list[Any]] = {}


def _root(store: dist.Store) -> dist.Store:
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return store


@contextlib.contextmanager
def borrowed_timeout(store: dist.Store) -> Iterator[None]:
    """Give the store its own timeout back once the last concurrent check is done.

    The check bounds its blocking calls through the store's timeout, which every
    ``PrefixStore`` over one store shares. Threads that share a store (the
    threaded process group, a framework calling the helper from threads) overlap,
    so each saving and restoring the value would restore another's temporary
    deadline; instead the first one in saves it and the last one out restores it.
    """
    root = _root(store)
    with _timeouts_lock:
        entry = _borrowed.setdefault(id(root), [root, root.timeout, 0])
        entry[2] += 1
    try:
        yield
    finally:
        with _timeouts_lock:
            entry[2] -= 1
            if entry[2] == 0:
                del _borrowed[id(root)]
                with contextlib.suppress(RuntimeError):  # the store is gone: said elsewhere
                    root.set_timeout(entry[1])
