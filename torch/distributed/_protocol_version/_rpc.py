"""The RPC family: the check ``init_rpc`` runs before it builds its backend.

``init_rpc`` builds its own store (a rendezvous for a static group, the options'
``init_method`` for a dynamic one), wraps it in ``PrefixStore("rpc_prefix_N")``
and hands it to the TensorPipe backend, which builds a ``ProcessGroupGloo``
directly on it: ``init_process_group`` is never called, so the hook sits in
``init_rpc``, after the prefixed store exists and before ``_init_rpc_backend``.

* A **static group** (``world_size`` given) runs the same exchange as the
  collectives, in the RPC family's own key namespace, with each worker's name in
  its payload: every worker returns the negotiated RPC version or raises.
* A **dynamic group** (no ``world_size``) has no fixed set of workers to wait
  for. Its first worker records, once, the version the group runs: the lowest RPC
  version it accepts, so that every build it can talk to may join. A joining
  worker whose range holds that version joins; any other fails alone, and the
  group's members go on.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch.distributed._protocol_version import _messages
from torch.distributed._protocol_version._exchange import exchange, raise_on_failure
from torch.distributed._protocol_version._families import RPC
from torch.distributed._protocol_version._payload import (
    InvalidPayload, local_info, MAX_PAYLOAD_BYTES, parse_payload, RankInfo, Verdict,
)
from torch.distributed._protocol_version._settings import active_mode, CHECK_MODE_ENV


logger = logging.getLogger(__name__)

_BACKEND = "tensorpipe"
# init_rpc's own default when the options carry no positive timeout.
_DEFAULT_TIMEOUT = timedelta(seconds=60)

# The RPC version negotiated by the last init_rpc of this process, or None.
_rpc_version: int | None = None


def _timeout(options: Any) -> timedelta:
    """``init_rpc`` gives its store the options' ``rpc_timeout``; the check uses the same."""
    seconds = getattr(options, "rpc_timeout", 0) or 0
    return timedelta(seconds=seconds) if seconds > 0 else _DEFAULT_TIMEOUT


def _gloo_key(rank: int) -> str:
    """The static group's ``ProcessGroupGloo`` is built directly on the hook's store,
    so gloo's own rank key (see ``_diagnose``) sits at its root."""
    return f"0/{rank}"


def _founding_record(info: RankInfo) -> str:
    payload = json.loads(info.to_payload(RPC))
    return json.dumps({"version": info.min_version, "rank": info.rank, "founder": payload})


def _read_record(raw: bytes) -> tuple[int, RankInfo]:
    """The dynamic group's version and the payload of the worker that founded it."""
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise InvalidPayload(f"a dynamic group record of {len(raw)} bytes, over the {MAX_PAYLOAD_BYTES}-byte limit")
    try:
        obj = json.loads(raw.decode("utf-8"))
        version, rank, founder = obj["version"], obj["rank"], obj["founder"]
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, RecursionError) as e:
        raise InvalidPayload(f"an unreadable dynamic group record ({e!r:.80})") from None
    if type(rank) is not int:
        raise InvalidPayload(f"a dynamic group record with an invalid rank {rank!r:.40}")
    info = parse_payload(rank, json.dumps(founder).encode())
    if type(version) is not int or not info.min_version <= version <= info.version:
        raise InvalidPayload(f"a dynamic group record with an invalid version {version!r:.40}")
    return version, info


def _join(store: dist.Store, name: str, rank: int, mode: str) -> tuple[Verdict, RankInfo]:
    """A worker joining a dynamic group: compatible when its range holds the
    version the group runs. Two store calls, whatever the group's size."""
    info = local_info(rank, RPC, mode, name)
    key = RPC.key("dynamic", "group")
    raw = store.compare_set(key, "", _founding_record(info))
    try:
        version, founder = _read_record(raw)
    except InvalidPayload as e:
        return Verdict("invalid", f"{RPC.title} check: the dynamic RPC group's record is {e}.", None), info
    if info.min_version <= version <= info.version:
        return Verdict("ok", "", version), info
    detail = (
        f"{RPC.title} mismatch: worker {name} (rank {rank}) cannot join the dynamic RPC group.\n"
        f"  the group runs {RPC.version_word} {version}, set by its first worker "
        f"{founder.name or '?'} (rank {founder.rank}, host {founder.hostname}, torch {founder.torch_version})\n"
        f"  this worker speaks {_messages.range_text(info.version, info.min_version, RPC.version_word)}\n"
        f"What to do: start this worker on a build that speaks {RPC.version_word} {version}, "
        "or restart the whole group on the new build. The group's members go on.\n"
        + "\n".join([RPC.note, *_messages.overrides_note([info])])
    )
    return Verdict("mismatch", detail, None, enforce=mode == "error"), info


def check_rpc_protocol_version(
    store: dist.Store, name: str, rank: int, world_size: int | None, options: Any
) -> None:
    """The hook ``init_rpc`` calls once its prefixed store exists and before it
    builds the backend. Follows ``TORCH_DISTRIBUTED_PROTOCOL_CHECK`` as the
    collectives' check does: one switch for the job, because an operator turns
    the guardrail off for a job, not for one of its wires."""
    global _rpc_version
    _rpc_version = None
    if world_size and not 0 <= rank < world_size:  # the backend refuses such a rank, as on stock
        return
    mode = active_mode(RPC)
    if mode is None:
        return
    if world_size:
        verdict, info = exchange(store, RPC, rank, world_size, _timeout(options), _BACKEND, mode, _gloo_key, name)
    else:
        verdict, info = _join(store, name, rank, mode)
    raise_on_failure(verdict, info, RPC)
    if verdict.ok:
        _rpc_version = verdict.negotiated
        logger.info("Worker %s (rank %s): RPC protocol version %s.", name, rank, verdict.negotiated)


def get_rpc_protocol_version() -> int:
    """Return the RPC protocol version this process's RPC group runs.

    Code that changes the RPC wire branches on this, as collectives branch on
    ``get_group_protocol_version()``.

    Raises:
        RuntimeError: RPC is not initialized, or its init negotiated no version
            (the check was off, or a mismatch was only warned about).
    """
    from torch.distributed.rpc.api import _is_current_rpc_agent_set

    if not _is_current_rpc_agent_set():
        raise RuntimeError("get_rpc_protocol_version() needs RPC: call torch.distributed.rpc.init_rpc() first.")
    if _rpc_version is None:
        raise RuntimeError(
            f"no RPC protocol version was negotiated: the check was off ({CHECK_MODE_ENV}=off), "
            "or a mismatch was only warned about."
        )
    return _rpc_version

