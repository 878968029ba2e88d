"""One check's context and deadline, bounded waits and presence tests. The
store's own timeout (shared by every ``PrefixStore`` over it) is never changed."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Sequence

import torch.distributed as dist
from torch.distributed._protocol_version._families import Family
from torch.distributed._protocol_version._payload import RankInfo


# Store timeouts are whole milliseconds, and some stores read 0 as "forever".
MIN_CALL_SECONDS = 0.05
# Between two looks at the store, once a blocking wait has outlasted the grace period.
POLL_SECONDS = 0.5


class Deadline:
    """One check's timeout, counted from this rank's arrival, as the store counts its own waits."""

    def __init__(self, timeout: timedelta) -> None:
        self.timeout = timeout
        self._start = time.monotonic()
        self._end = self._start + timeout.total_seconds()

    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def remaining(self) -> float:
        return self._end - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def pause(self) -> None:
        """Sleep before the next look; never past a tenth of what is left, so that
        a rank arriving in the last moments is seen in time."""
        time.sleep(max(min(POLL_SECONDS, self.remaining() / 10), 0.001))


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
    token: str  # rank 0's names the check it opens
    backend_key: Callable[[int], str] | None  # see _exchange.exchange
    grace: float  # how long a wait blocks before the rank looks for ranks without the check
    bounded: bool  # a warn rank: it waits for the others for the grace period only
    doing: str = "starting"  # for the message, should the store fail

    def key(self, *parts: object) -> str:
        return self.family.key(*parts)


def is_timeout(error: RuntimeError) -> bool:
    """TCPStore and HashStore time out with ``DistStoreError``, FileStore with a ``RuntimeError``."""
    if isinstance(error, dist.DistNetworkError):
        return False
    return isinstance(error, dist.DistStoreError) or "timeout" in str(error).lower()


def wait_for(store: dist.Store, keys: Sequence[str], seconds: float) -> bool:
    """Block until every key exists, for at most ``seconds``; ``False`` on a timeout
    (``LookupError`` is how torchelastic's ``EtcdStore`` times out)."""
    try:
        store.wait(list(keys), timedelta(seconds=max(seconds, MIN_CALL_SECONDS)))
        return True
    except LookupError:
        return False
    except RuntimeError as e:
        if is_timeout(e):
            return False
        raise


def present(store: dist.Store, keys: Sequence[str]) -> bool:
    """Whether every key exists, without waiting; a ``Store`` subclass with only
    ``set``, ``get`` and ``wait`` is asked with the shortest ``wait`` instead."""
    try:
        return store.check(list(keys))
    except dist.DistError:
        raise
    except RuntimeError:  # "Tried to call pure virtual function ... check"
        return wait_for(store, keys, MIN_CALL_SECONDS)


def find_present(store: dist.Store, keys: Sequence[str]) -> list[int]:
    """Indices of the ``keys`` that exist, by bisection: O(m log n) presence
    tests when ``m`` of ``n`` keys differ from the rest."""
    if not keys:
        return []
    if present(store, keys):
        return list(range(len(keys)))
    if len(keys) == 1:
        return []
    middle = len(keys) // 2
    return find_present(store, keys[:middle]) + [middle + i for i in find_present(store, keys[middle:])]
