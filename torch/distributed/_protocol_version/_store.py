"""Bounded store calls (the store's own timeout is never changed), and the watcher that turns a backend's trace
into a key."""

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta

import torch.distributed as dist
from torch._C._distributed_c10d import Store


__all__ = ["count", "delete", "find_present", "present", "supports", "wait_for", "watching"]

logger = logging.getLogger(__name__)

# Store timeouts are whole milliseconds, and some stores read 0 as "forever".
MIN_CALL_SECONDS = 0.05
# Between two looks of the watcher at a backend's trace.
WATCH_SECONDS = 0.1


def supports(error: RuntimeError) -> bool:
    """``False`` for a Python ``Store`` subclass that lacks a method ("Tried to call pure virtual function")."""
    return isinstance(error, dist.DistError) or "pure virtual" not in str(error)


def wait_for(store: Store, keys: Sequence[str], seconds: float) -> bool:
    """Block until every key exists, for at most ``seconds``; ``False`` on a timeout (``DistStoreError``,
    FileStore's ``RuntimeError``, torchelastic's ``EtcdStore``'s ``LookupError``)."""
    try:
        store.wait(list(keys), timedelta(seconds=max(seconds, MIN_CALL_SECONDS)))
        return True
    except LookupError:
        return False
    except RuntimeError as e:
        if isinstance(e, dist.DistStoreError) or ("timeout" in str(e).lower() and not isinstance(e, dist.DistError)):
            return False
        raise


def present(store: Store, keys: Sequence[str]) -> bool:
    """Whether every key exists, without waiting (the shortest ``wait`` on a store without ``check``)."""
    try:
        return store.check(list(keys))
    except RuntimeError as e:
        if supports(e):
            raise
        return wait_for(store, keys, MIN_CALL_SECONDS)


def find_present(store: Store, keys: Sequence[str]) -> list[int]:
    """Indices of the ``keys`` that exist, by bisection: O(m log n) calls when ``m`` of ``n`` keys differ."""
    if not keys or present(store, keys):
        return list(range(len(keys)))
    if len(keys) == 1:
        return []
    middle = len(keys) // 2
    return find_present(store, keys[:middle]) + [middle + i for i in find_present(store, keys[middle:])]


def count(store: Store, key: str, amount: int) -> int | None:
    """``store.add(key, amount)``; ``None`` on a store without ``add``."""
    try:
        return store.add(key, amount)
    except RuntimeError as e:
        if supports(e):
            raise
        return None


def delete(store: Store, keys: Sequence[str]) -> None:
    """Delete ``keys``; a store without ``delete_key`` keeps them."""
    try:
        for key in keys:
            store.delete_key(key)
    except RuntimeError as e:
        if supports(e):
            raise


@contextmanager
def watching(store: Store, after: float, look: Callable[[Store], bool] | None) -> Iterator[None]:
    """While the body blocks on the store, call ``look(clone)`` every :data:`WATCH_SECONDS` from ``after`` seconds
    on until it returns ``True``: it writes the key a rank without the check never will, from a thread on its own
    connection, so the wait stays one blocking call."""
    if look is None:
        yield
        return
    stop = threading.Event()

    def run() -> None:
        try:
            if not stop.wait(after):
                clone = store.clone()  # type: ignore[attr-defined]  # every c10d store has it; the stub lacks it
                while not look(clone) and not stop.wait(WATCH_SECONDS):
                    pass
        except RuntimeError as e:  # the wait itself reports what the store does
            logger.debug("protocol version watcher stopped: %s", e)

    thread = threading.Thread(target=run, name="protocol-version-watcher", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
