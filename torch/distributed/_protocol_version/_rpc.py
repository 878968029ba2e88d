"""The check ``init_rpc`` runs on its ``PrefixStore("rpc_prefix_N")`` before it builds the backend. A static
group runs the collectives' exchange; a dynamic one has no set of workers to wait for: its first worker records
the version the group runs, and a joining worker whose range does not hold it fails alone."""

import logging
from datetime import timedelta
from typing import Any

from torch._C._distributed_c10d import Store
from torch.distributed._protocol_version import _attempt_namespace, _messages, _rpc_negotiated
from torch.distributed._protocol_version._exchange import exchange, raise_on_failure, mode_or_tell
from torch.distributed._protocol_version._families import RPC
from torch.distributed._protocol_version._payload import InvalidPayload, local_info, parse_payload, RankInfo, Verdict


logger = logging.getLogger(__name__)


def _join(store: Store, name: str, rank: int, mode: str) -> tuple[Verdict, RankInfo]:
    """A worker joining a dynamic group, which runs the lowest version its first worker accepts."""
    info = local_info(rank, RPC, mode, name)
    try:
        founder = parse_payload(-1, store.compare_set(RPC.key("dynamic", "group"), "", info.to_payload(RPC)))
    except InvalidPayload as e:
        return Verdict("invalid", f"{RPC.title} check: the dynamic RPC group's record is invalid ({e}).", None), info
    version = founder.min_version
    if info.min_version <= version <= info.version:
        return Verdict("ok", "", version), info
    detail = "\n".join([
        f"{RPC.title} mismatch: worker {name} (rank {rank}) cannot join the dynamic RPC group.",
        f"  the group runs {RPC.version_word} {version}, set by its first worker {founder.name or '?'} "
        f"(host {founder.hostname}, torch {founder.torch_version})",
        f"  this worker speaks {_messages.range_text(info.version, info.min_version, RPC.version_word)}",
        f"What to do: start this worker on a build that speaks {RPC.version_word} {version}, or restart the whole "
        "group on the new build. The group's members go on.",
        RPC.note,
    ])
    return Verdict("mismatch", detail, None, enforce=mode == "error"), info


def check_rpc_protocol_version(store: Store, name: str, rank: int, world_size: int | None, options: Any) -> None:
    """The hook ``init_rpc`` calls before it builds the backend; ``TORCH_DISTRIBUTED_PROTOCOL_CHECK`` rules it too."""
    _rpc_negotiated["version"] = None
    if world_size and not 0 <= rank < world_size:  # the backend refuses a bad rank
        return
    # init_rpc prefixes its store per init; a restarted attempt may find the last one's gloo keys
    # (gloo is built on the store's root: "0/<rank>").
    namespace, first = _attempt_namespace("rpc", 0)
    mode = mode_or_tell(store, RPC, namespace, rank, world_size or 1, "tensorpipe")  # a dynamic group: no one to tell
    if mode is None:
        return
    if world_size:
        seconds = getattr(options, "rpc_timeout", 0) or 0
        seconds = seconds if seconds > 0 else 60  # init_rpc's own default without a positive timeout
        trace = (lambda r: f"0/{r}") if first else None
        timeout = timedelta(seconds=seconds)
        outcome = exchange(store, RPC, rank, world_size, timeout, "tensorpipe", mode, namespace, trace, name)
        verdict, info = outcome.verdict, outcome.info
    else:
        verdict, info = _join(store, name, rank, mode)
    raise_on_failure(verdict, info, RPC)
    if verdict.ok and not verdict.without:  # a worker it was reached without may not speak it
        _rpc_negotiated["version"] = verdict.negotiated
        logger.info("Worker %s (rank %s): RPC protocol version %s.", name, rank, verdict.negotiated)
