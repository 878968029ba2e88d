"""What code outside ``init_process_group`` asks of the guardrail, loaded on first
use: :func:`check_protocol_version` for a group a framework builds itself, and the
versions this rank announces."""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist
from torch.distributed._protocol_version._exchange import exchange, raise_on_failure
from torch.distributed._protocol_version._families import C10D
from torch.distributed._protocol_version._settings import version_range


__all__ = ["check_protocol_version", "get_min_protocol_version", "get_protocol_version"]


def _validate_args(store: dist.Store, rank: int, world_size: int, timeout: timedelta) -> None:
    """The caller's arguments, named, before any store traffic (``init_process_group`` validates its own)."""
    if not isinstance(store, dist.Store):
        raise TypeError(f"store must be a torch.distributed.Store, got {type(store).__name__}")
    for name, value in (("rank", rank), ("world_size", world_size)):
        if type(value) is not int:  # bool is an int, and True is no rank
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r:.40}")
    if not isinstance(timeout, timedelta):
        raise TypeError(f"timeout must be a datetime.timedelta, got {type(timeout).__name__} {timeout!r:.40}")
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if timeout.total_seconds() <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")


def check_protocol_version(
    store: dist.Store, rank: int, world_size: int, timeout: timedelta = timedelta(minutes=30), *, backend: str = "unknown"
) -> int:
    """Check that every rank speaks a common protocol version, through ``store``.

    For frameworks that build process groups without ``init_process_group``: call
    it on every rank with the same store before building the group. Each call
    judges only its own ranks. Ignores ``TORCH_DISTRIBUTED_PROTOCOL_CHECK``:
    calling it is the decision to check.

    Args:
        store: a store that all ranks of this group, and only they, use for the
            check (``set``, ``get`` and ``wait`` are needed; ``check`` is used).
        rank: this rank, in ``[0, world_size)``.
        world_size: the number of ranks.
        timeout: how long this rank waits for the others, from its arrival.
        backend: names the backend in messages.

    Returns:
        The negotiated version: the highest version every rank speaks.

    Raises:
        ProtocolVersionError: the ranks share no protocol version, or one of them
            published an invalid payload.
        DistStoreError: a rank did not publish within ``timeout``.
        SettingError: an override variable holds an invalid value.
        TypeError, ValueError: an invalid argument.
    """
    _validate_args(store, rank, world_size, timeout)
    verdict, info = exchange(store, C10D, rank, world_size, timeout, backend, "error")
    raise_on_failure(verdict, info, C10D)
    assert verdict.negotiated is not None  # a mismatch in "error" mode raised
    return verdict.negotiated


def get_protocol_version() -> int:
    """Return the protocol version this rank announces.

    Returns:
        :data:`PROTOCOL_VERSION`, or ``TORCH_DISTRIBUTED_PROTOCOL_VERSION_OVERRIDE``.

    Raises:
        SettingError: an override variable holds an invalid value.
    """
    return version_range(C10D)[1]


def get_min_protocol_version() -> int:
    """Return the oldest protocol version this rank accepts.

    Returns:
        The minimum override; else the version override (exactly that version);
        else :data:`MIN_PROTOCOL_VERSION`.

    Raises:
        SettingError: an override variable holds an invalid value.
    """
    return version_range(C10D)[0]
