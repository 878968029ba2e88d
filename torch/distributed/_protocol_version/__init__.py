"""Protocol version guardrail for ``torch.distributed``.

Every build declares the range of c10d wire protocol versions it speaks:
``[MIN_PROTOCOL_VERSION, PROTOCOL_VERSION]``. ``init_process_group`` calls
:func:`_check_protocol_version` after the rendezvous store exists and before any
backend is built, so a job that mixes incompatible builds (a rolling update gone
wrong) fails early, on every rank, with one message that names the ranks, hosts
and builds, instead of hanging in backend setup or corrupting data.

The package, one concern a file: ``_versions`` (the numbers a maintainer bumps),
``_families`` (each versioned wire as data), ``_settings`` (environment),
``_payload`` (what is written to the store, parsed strictly), ``_judge`` (the
rule, the negotiated version, the advice), ``_messages`` (every sentence),
``_store`` (deadlines and bounded store calls), ``_exchange`` (the store
protocol), ``_diagnose`` (the slow path: late, missing and unchecked ranks),
``_rpc`` (the RPC family's hook, static and dynamic groups), ``_preflight`` (the
check of a whole job without a backend) and ``_cli``
(``python -m torch.distributed._protocol_version``).

Environment variables (read on every check, validated before any store traffic):

* ``TORCH_DISTRIBUTED_PROTOCOL_CHECK``: ``error`` (default), ``warn`` or ``off``.
* ``TORCH_DISTRIBUTED_PROTOCOL_VERSION_OVERRIDE`` and
  ``TORCH_DISTRIBUTED_MIN_PROTOCOL_VERSION_OVERRIDE``: announce another range,
  to simulate other builds in tests; never for production.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Sequence

import torch.distributed as dist
from torch.distributed._protocol_version._cli import main as _cli_main
from torch.distributed._protocol_version._diagnose import backend_buildable, backend_key_for
from torch.distributed._protocol_version._exchange import exchange, raise_on_failure
from torch.distributed._protocol_version._families import C10D, RPC
# _check_rpc_protocol_version is the entry point of the hook in init_rpc.
from torch.distributed._protocol_version._rpc import (  # noqa: F401
    check_rpc_protocol_version as _check_rpc_protocol_version,
    get_rpc_protocol_version,
)
from torch.distributed._protocol_version._settings import (
    CHECK_MODE_ENV,
    CHECK_MODES,
    check_mode,
    SettingError,
    version_range,
)
from torch.distributed._protocol_version._versions import (
    MIN_PROTOCOL_VERSION,
    MIN_RPC_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    RPC_PROTOCOL_VERSION,
)


__all__ = [
    "CHECK_MODE_ENV",
    "CHECK_MODES",
    "MIN_PROTOCOL_VERSION",
    "MIN_RPC_PROTOCOL_VERSION",
    "MIN_VERSION_OVERRIDE_ENV",
    "PROTOCOL_VERSION",
    "RPC_MIN_VERSION_OVERRIDE_ENV",
    "RPC_PROTOCOL_VERSION",
    "RPC_VERSION_OVERRIDE_ENV",
    "SettingError",
    "VERSION_OVERRIDE_ENV",
    "check_protocol_version",
    "get_group_protocol_version",
    "get_min_protocol_version",
    "get_protocol_version",
    "get_rpc_protocol_version",
]

VERSION_OVERRIDE_ENV = C10D.version_env
MIN_VERSION_OVERRIDE_ENV = C10D.min_version_env
RPC_VERSION_OVERRIDE_ENV = RPC.version_env
RPC_MIN_VERSION_OVERRIDE_ENV = RPC.min_version_env

# The c10d logger: the outcome lands beside init_process_group's own log lines.
logger = logging.getLogger("torch.distributed.distributed_c10d")

# Negotiated version of the default group, recorded by the last check that
# init_process_group ran; None when none was negotiated, and the note says why.
_default_group_version: int | None = None
_default_group_note: str = "init_process_group has not run the protocol version check"


def get_protocol_version() -> int:
    """Return the protocol version this rank announces: :data:`PROTOCOL_VERSION`,
    or ``TORCH_DISTRIBUTED_PROTOCOL_VERSION_OVERRIDE``. Raises ``RuntimeError``
    (a :class:`SettingError`) on an invalid override."""
    return version_range(C10D)[1]


def get_min_protocol_version() -> int:
    """Return the oldest protocol version this rank accepts from its peers.

    ``TORCH_DISTRIBUTED_MIN_PROTOCOL_VERSION_OVERRIDE`` wins when set; a version
    override alone means "exactly this version"; otherwise
    :data:`MIN_PROTOCOL_VERSION`.
    """
    return version_range(C10D)[0]


def _validate_args(store: dist.Store, rank: int, world_size: int, timeout: timedelta) -> None:
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
    store: dist.Store,
    rank: int,
    world_size: int,
    timeout: timedelta = timedelta(minutes=30),
    *,
    backend: str | None = "unknown",
) -> int:
    """Check that every rank speaks a common protocol version, through ``store``.

    For frameworks that build process groups without ``init_process_group`` (for
    example ``ProcessGroupGloo`` constructed directly on a store): call it on every
    rank with the same store, before building the group. Every rank returns the
    negotiated version (the highest version all ranks speak), or every rank
    raises: ``RuntimeError`` on a mismatch, ``DistStoreError`` on a timeout, the
    store's own error type if the store fails. Safe to call again on the same
    store; each call judges only the ranks of that call. Ignores
    ``TORCH_DISTRIBUTED_PROTOCOL_CHECK``: calling it is the decision to check.
    ``backend`` only names the backend in messages.
    """
    _validate_args(store, rank, world_size, timeout)
    verdict, info = exchange(store, C10D, rank, world_size, timeout, backend or "unknown", "error")
    raise_on_failure(verdict, info, C10D)
    assert verdict.negotiated is not None  # a mismatch in "error" mode raised
    return verdict.negotiated


def _check_protocol_version(
    store: dist.Store,
    rank: int,
    world_size: int,
    timeout: timedelta,
    backend: object,
    group_name: str | None = None,
) -> None:
    """The hook ``init_process_group`` calls before it builds the backend.

    Skipped for the fake backend (its store records nothing) before anything is
    read, and when the check is off (no store traffic). Arguments that stock torch
    rejects at once (a rank outside the world, a backend this build cannot make)
    are left to stock's own check, which comes next: a check here would wait for
    peers first, and turn an instant error into a timeout. MPI never reaches this call: it has no store. Records the negotiated
    version for :func:`get_group_protocol_version`.
    """
    global _default_group_version, _default_group_note
    _default_group_version = None
    if str(backend) == "fake":
        _default_group_note = "the fake backend has no store to check through"
        return
    mode = check_mode()
    version_range(C10D)  # a bad override is an error in every mode
    if mode == "off":
        _default_group_note = f"the check was off ({CHECK_MODE_ENV}=off)"
        return
    if world_size < 1 or not 0 <= rank < world_size:
        _default_group_note = f"rank {rank} is outside a world of size {world_size}"
        return
    if not backend_buildable(str(backend)):
        _default_group_note = f"this build cannot make backend {backend}"
        return  # stock refuses it next, at once
    started = time.monotonic()
    verdict, info = exchange(
        store, C10D, rank, world_size, timeout, str(backend), mode,
        backend_key_for(str(backend), group_name) if group_name else None,
    )
    elapsed = time.monotonic() - started
    if not verdict.ok and verdict.status == "mismatch" and not verdict.enforce:
        _default_group_note = f"the ranks share no protocol version (every rank runs {CHECK_MODE_ENV}=warn)"
    elif not verdict.ok:
        logger.error("Rank %s: protocol version check failed after %.3fs.", rank, elapsed)
    raise_on_failure(verdict, info, C10D)
    if verdict.ok:
        _default_group_version = verdict.negotiated
        logger.info(
            "Rank %s: protocol version check passed in %.3fs: world size %s, "
            "negotiated protocol version %s (this rank speaks %s-%s).",
            rank, elapsed, world_size, verdict.negotiated, info.min_version, info.version,
        )


def get_group_protocol_version() -> int:
    """Return the protocol version the default process group negotiated.

    Code that changes the wire protocol branches on this: new behaviour switches
    on only once every rank speaks the new version. Raises ``RuntimeError`` when
    there is no default group, or when its init did not negotiate a version
    (check off, mismatch downgraded to a warning, MPI or fake backend).
    """
    if not dist.is_initialized():
        raise RuntimeError(
            "get_group_protocol_version() needs the default process group: call "
            "torch.distributed.init_process_group() first."
        )
    backend = str(dist.get_backend())
    if backend in ("mpi", "fake"):
        raise RuntimeError(f"the {backend} backend does not negotiate a protocol version")
    if _default_group_version is None:
        raise RuntimeError(f"no protocol version was negotiated: {_default_group_note}")
    return _default_group_version


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m torch.distributed._protocol_version``: see :mod:`._cli`."""
    return _cli_main(argv)
