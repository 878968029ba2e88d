"""Store plumbing for one check: its context, its deadline, bounded waits and
presence tests.

The check uses ``set``, ``get`` and ``wait`` on its normal path, the calls every
store that ``init_process_group`` accepts implements, and ``check`` only once a
wait has outlasted its grace period. It never changes the store's timeout, which
every ``PrefixStore`` over one store shares with other users: each bounded wait
passes its own timeout to ``wait``, and a ``get`` follows only once the key is
known to exist.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Sequence

import torch.distributed as dist
from torch.distributed._protocol_version._families import Family
from torch.distributed._protocol_version._payload import RankInfo


# Store timeouts are whole milliseconds and some stores read 0 as "forever":
# never wait for less.
MIN_CALL_SECONDS = 0.05
# How often the slow path looks at the store again; more often near the deadline,
# so that a rank arriving in the last moments of the timeout is seen in time.
POLL_SECONDS = 0.25
_MIN_POLL_SECONDS = 0.02


class Deadline:
    """One check's timeout, counted from this rank's arrival, as the store counts its own waits."""

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
    token: str  # this rank's own token; rank 0's names the check it opens
    # The key a rank's backend writes as soon as it starts building, or None when
    # the backend writes none at once (NCCL, most plugins).
    backend_key: Callable[[int], str] | None
    grace: float  # how long a wait blocks before the slow path starts
    # What the check is doing, for the message should the store fail meanwhile.
    doing: str = "starting"

    def key(self, *parts: object) -> str:
        return self.family.key(*parts)


def is_timeout(error: RuntimeError) -> bool:
    """Whether a store error is a timeout: TCPStore and HashStore raise
    ``DistStoreError``, FileStore a ``RuntimeError`` that says so."""
    if isinstance(error, dist.DistNetworkError):
        return False
    return isinstance(error, dist.DistStoreError) or "timeout" in str(error).lower()


def wait_for(store: dist.Store, keys: Sequence[str], seconds: float) -> bool:
    """Block until every key exists, for at most ``seconds``; ``False`` on a timeout.

    Any other store error propagates.
    """
    try:
        store.wait(list(keys), timedelta(seconds=max(seconds, MIN_CALL_SECONDS)))
        return True
    except RuntimeError as e:
        if is_timeout(e):
            return False
        raise


def present(store: dist.Store, keys: Sequence[str]) -> bool:
    """Whether every key exists, without waiting.

    A ``Store`` subclass that implements only what ``init_process_group`` needs
    (``set``, ``get``, ``wait``) has no ``check``: it is asked with the shortest
    ``wait`` instead.
    """
    try:
        return store.check(list(keys))
    except dist.DistError:
        raise
    except RuntimeError:  # "Tried to call pure virtual function ... check"
        return wait_for(store, keys, MIN_CALL_SECONDS)


def find_present(store: dist.Store, keys: Sequence[str]) -> list[int]:
    """Indices of the ``keys`` that exist, by bisection.

    One presence test of a list answers "are all there?", so a list in which
    ``m`` keys differ from the rest costs O(m log n) calls instead of n.
    """
    if not keys:
        return []
    if present(store, keys):
        return list(range(len(keys)))
    if len(keys) == 1:
        return []
    middle = len(keys) // 2
    return find_present(store, keys[:middle]) + [middle + i for i in find_present(store, keys[middle:])]
