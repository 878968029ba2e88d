"""Observe which guardrail a torch really runs: in a fresh venv, or under a mutation.

The packaging test runs this file with the interpreter of a fresh venv holding the
built wheel (where neither pytest nor this repo's torch is importable); the
mutation test imports :func:`init_rank` directly. Evidence comes from inside the
process that ran the code: the compiled ``init_process_group`` (not the file on
disk, which an in-memory mutation leaves as it is), the module files, the marker
of a mutation, the distribution's version.

    python protocol_version_probe.py inspect          # JSON: evidence and a RECORD check
    python protocol_version_probe.py job '{"1": 2}' 2 PORT  # JSON: one RankResult per rank
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib.metadata
import inspect
import json
import os
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from protocol_version_mutation import MARKER
from torch.testing._internal.distributed.protocol_version_utils import (
    all_reduce_and_version,
    spawn_ranks,
    versions_env,
)


def guardrail_evidence() -> dict[str, Any]:
    """What this process's torch.distributed runs, as plain data."""
    from torch.distributed import _protocol_version as pv, distributed_c10d as c10d

    init = inspect.unwrap(c10d._new_process_group_helper)
    return {
        "torch_distribution": importlib.metadata.version("torch"),
        "c10d_file": c10d.__file__,
        "module_file": pv.__file__,
        "module_is_symlink": os.path.islink(pv.__file__),
        # The hook's import names the function: present in the code that was compiled.
        "hook_compiled": "_check_protocol_version" in init.__code__.co_names,
        "mutations": sorted(filter(None, (getattr(m, MARKER, None) for m in (c10d, pv)))),
    }


def _negotiated_or_none() -> int | None:
    """The default group's negotiated version; None when init ran no check."""
    from torch.distributed._protocol_version import get_group_protocol_version

    try:
        return get_group_protocol_version()
    except RuntimeError:
        return None


def init_rank(rank: int, world_size: int, port: int) -> dict[str, Any]:
    """``init_process_group`` (gloo, ``tcp://``), one all_reduce, destroy; report.

    Raises what ``init_process_group`` raises: with the guardrail in place and
    mixed versions, the mismatch error. Without it, init goes through.
    """
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        return {**all_reduce_and_version(torch, _negotiated_or_none), **guardrail_evidence()}
    finally:
        dist.destroy_process_group()


def _add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a + b


def rpc_rank(rank: int, world_size: int, port: int) -> dict[str, Any]:
    """``init_rpc`` (static group, TensorPipe), one ``rpc_sync`` to worker 0,
    shutdown; report the sum, whether the hook was compiled into ``init_rpc`` and
    which mutations ran. Raises what ``init_rpc`` raises."""
    from torch.distributed import rpc

    options = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}", rpc_timeout=60)
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size, rpc_backend_options=options)
    try:
        total = rpc.rpc_sync(f"worker{1 - rank}", _add, args=(torch.ones(1), torch.ones(1))).item()
    finally:
        rpc.shutdown()
    init = inspect.unwrap(rpc.init_rpc)
    return {
        "sum": total,
        "hook_compiled": "check_rpc_protocol_version" in init.__code__.co_names,
        "mutations": [m for m in [getattr(rpc, MARKER, None)] if m],
    }


def verify_record(distribution: str = "torch") -> dict[str, Any]:
    """Check every installed file against the digest and size in RECORD.

    pip copies the wheel's digests into the installed RECORD for the files it
    unpacks unchanged, so this verifies the wheel's RECORD as built.
    """
    mismatched, unhashed, checked = [], [], 0
    for file in importlib.metadata.files(distribution) or []:
        if file.hash is None:
            unhashed.append(str(file))
            continue
        path = file.locate()
        with open(path, "rb") as data:
            digest = hashlib.file_digest(data, file.hash.mode).digest()
        value = file.hash.value
        recorded = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        if digest != recorded or os.path.getsize(path) != file.size:
            mismatched.append(str(file))
        checked += 1
    return {"checked": checked, "mismatched": mismatched, "unhashed": unhashed}


def main(argv: list[str]) -> int:
    if argv[:1] == ["inspect"]:
        report: Any = {"evidence": guardrail_evidence(), "record": verify_record()}
    elif argv[:1] == ["job"] and len(argv) == 4:
        versions = {int(rank): version for rank, version in json.loads(argv[1]).items()}
        results = spawn_ranks(
            init_rank, int(argv[2]), args=(int(argv[3]),), rank_env=versions_env(versions)
        )
        report = [dataclasses.asdict(result) for result in results]
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
