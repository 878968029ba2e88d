"""Protocol version guardrail for ``torch.distributed``.

Every build declares the range of c10d wire protocol versions it speaks,
``[MIN_PROTOCOL_VERSION, PROTOCOL_VERSION]``. ``_new_process_group_helper``
calls :func:`_check_protocol_version` for the default group once stock has
validated its arguments and right before the first backend is constructed: a
job that mixes incompatible builds fails there, on every rank, with one message
that names the ranks, hosts and builds.

This module and what it imports are what every ``init_process_group`` loads;
``_rpc`` loads with ``init_rpc``, ``_agent`` with torchrun's agents, the rest
(:data:`_LAZY`, ``_preflight``, ``_cli``) when used. ``TORCH_DISTRIBUTED_PROTOCOL_CHECK``
is ``error``, ``warn`` or ``off``; the version overrides simulate other builds in tests.
"""

from __future__ import annotations

import importlib
import logging
import time
import weakref
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch.distributed._protocol_version._diagnose import gloo_key
from torch.distributed._protocol_version._exchange import exchange, ProtocolVersionError, raise_on_failure
from torch.distributed._protocol_version._families import C10D, RPC
from torch.distributed._protocol_version._settings import active_mode, CHECK_MODE_ENV, CHECK_MODES, SettingError
from torch.distributed._protocol_version._versions import (
    MIN_PROTOCOL_VERSION, MIN_RPC_PROTOCOL_VERSION, PROTOCOL_VERSION, RPC_PROTOCOL_VERSION,
)


__all__ = [
    "CHECK_MODE_ENV", "CHECK_MODES", "MIN_PROTOCOL_VERSION", "MIN_RPC_PROTOCOL_VERSION",
    "MIN_VERSION_OVERRIDE_ENV", "PROTOCOL_VERSION", "ProtocolVersionError", "RPC_MIN_VERSION_OVERRIDE_ENV",
    "RPC_PROTOCOL_VERSION", "RPC_VERSION_OVERRIDE_ENV", "SettingError", "VERSION_OVERRIDE_ENV",
    "check_protocol_version", "get_group_protocol_version", "get_min_protocol_version",
    "get_protocol_version", "get_rpc_protocol_version",
]

VERSION_OVERRIDE_ENV = C10D.version_env
MIN_VERSION_OVERRIDE_ENV = C10D.min_version_env
RPC_VERSION_OVERRIDE_ENV = RPC.version_env
RPC_MIN_VERSION_OVERRIDE_ENV = RPC.min_version_env

logger = logging.getLogger(__name__)

# The version each checked default group negotiated (None: none), keyed by the
# store the group is registered with in ``_world.pg_map``: the entry lives and
# dies with its group, and each thread of the threaded test group has its own.
_negotiated: weakref.WeakKeyDictionary[dist.Store, int | None] = weakref.WeakKeyDictionary()


def _check_protocol_version(
    store: dist.Store, group_store: dist.Store, rank: int, world_size: int, timeout: timedelta,
    backend: str, device: str, group_name: str, default_group: bool,
) -> None:
    """The hook ``_new_process_group_helper`` calls right before it constructs a
    backend, all arguments validated. Checks the default group once (later groups
    have the same ranks); the fake backend has no store to check through."""
    if not default_group or group_store in _negotiated or backend == "fake":
        return
    _negotiated[group_store] = None
    if not 0 <= rank < world_size:  # the backend refuses such a rank next, as on stock
        return
    mode = active_mode(C10D)
    if mode is None:
        return
    backend_key = gloo_key(group_name, device) if backend == "gloo" else None
    started = time.monotonic()
    verdict, info = exchange(store, C10D, rank, world_size, timeout, backend, mode, backend_key)
    raise_on_failure(verdict, info, C10D)
    if verdict.ok and not verdict.partial:  # a rank it was judged without may not speak it
        _negotiated[group_store] = verdict.negotiated
        logger.info(
            "Rank %s: protocol version check passed in %.3fs: world size %s, negotiated protocol "
            "version %s (this rank speaks %s-%s).", rank, time.monotonic() - started, world_size,
            verdict.negotiated, info.min_version, info.version,
        )


def get_group_protocol_version() -> int:
    """Return the protocol version the default process group negotiated.

    Code that changes the wire protocol branches on this: new behaviour switches
    on only once every rank speaks the new version.

    Returns:
        The highest version every rank of the default group speaks.

    Raises:
        RuntimeError: there is no default group, or its init negotiated no
            version (the check was off, a mismatch was downgraded to a warning,
            ``warn`` judged without some ranks, or its backend has no store: MPI, fake).
    """
    if not dist.is_initialized():
        raise RuntimeError(
            "get_group_protocol_version() needs the default process group: call "
            "torch.distributed.init_process_group() first."
        )
    group_store = dist.distributed_c10d._get_process_group_store(dist.distributed_c10d._get_default_group())
    version = _negotiated.get(group_store)
    if version is None:
        raise RuntimeError(
            f"the default process group negotiated no protocol version: the check was off "
            f"({CHECK_MODE_ENV}=off), a mismatch was only warned about, the check ({CHECK_MODE_ENV}=warn) "
            f"was judged without some ranks, or the backend ({dist.get_backend()}) has no store to check through."
        )
    return version


# Public functions that ``init_process_group`` never needs, and the module each loads with.
_LAZY = {
    "check_protocol_version": "_standalone", "get_min_protocol_version": "_standalone",
    "get_protocol_version": "_standalone", "get_rpc_protocol_version": "_rpc",
}


def __getattr__(name: str) -> Any:
    """Load what every ``init_process_group`` does not need on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
