"""``python -m torch.distributed._protocol_version [--json]``: what this node
announces, checked before it joins a job; with ``--preflight``, the check of the
whole job, run across the cluster (see :mod:`._preflight`)."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from datetime import timedelta
from typing import Any, TYPE_CHECKING

import torch.distributed as dist
from torch._C._distributed_c10d import TCPStore
from torch.distributed._protocol_version import _preflight
from torch.distributed._protocol_version._families import C10D, RPC
from torch.distributed._protocol_version._payload import local_info
from torch.distributed._protocol_version._settings import check_mode, SettingError, version_range


if TYPE_CHECKING:
    from collections.abc import Sequence


# torchrun sets it to "True" when its agent hosts the store and every worker is a client.
AGENT_STORE_ENV = "TORCHELASTIC_USE_AGENT_STORE"
# The longest --timeout: a year, far inside what a store's millisecond timeout holds.
MAX_TIMEOUT_S = 365 * 24 * 3600.0
EXIT_BAD_SETTING = 2
_HOW_TO_RUN = "run under torchrun, or pass --store, --rank and --world-size."


def describe_build() -> dict[str, Any]:
    """Describe what this node will announce, validating its settings as
    ``init_process_group`` and ``init_rpc`` do, in every mode.

    Returns:
        The collectives' versions at the top level and the RPC family's under
        ``"rpc"``; the build's identity as its payload carries it (torch
        distribution version, torch commit, Python version, backend libraries);
        the check mode and the overrides set.

    Raises:
        SettingError: a setting holds an invalid value.
    """
    mode = check_mode()
    info = local_info(0, C10D, "error")
    rpc_minimum, rpc_version = version_range(RPC)
    return {
        "protocol_version": info.version,
        "min_protocol_version": info.min_version,
        "rpc": {"protocol_version": rpc_version, "min_protocol_version": rpc_minimum},
        "torch_version": info.torch_version,
        "git_version": info.git_version,
        "python_version": info.python_version,
        "backend_versions": dict(info.backend_versions),
        "check_mode": mode,
        "overrides": {n: os.environ[n] for f in (C10D, RPC) for n in (f.version_env, f.min_version_env)
                      if n in os.environ},
    }


def _print_text(build: dict[str, Any]) -> None:
    overrides = ", ".join(f"{k}={v!r}" for k, v in build["overrides"].items()) or "none"
    backends = ", ".join(f"{name} {v}" for name, v in build["backend_versions"].items()) or "none reported"
    print(f"protocol version:     {build['protocol_version']}")
    print(f"minimum accepted:     {build['min_protocol_version']}")
    print(f"RPC protocol version: {build['rpc']['protocol_version']}")
    print(f"RPC minimum accepted: {build['rpc']['min_protocol_version']}")
    print(f"torch version:        {build['torch_version']}")
    print(f"torch commit:         {build['git_version']}")
    print(f"python version:       {build['python_version']}")
    print(f"backend libraries:    {backends}")
    print(f"check mode:           {build['check_mode']}")
    print(f"overrides in effect:  {overrides}")


def _env_int(name: str) -> int:
    raw = os.environ.get(name)
    if raw is None or not raw.strip().isdigit():
        what = "not set" if raw is None else f"{raw[:40]!r}, not a non-negative integer"
        raise SettingError(f"{name} is {what}: {_HOW_TO_RUN}")
    return int(raw)


def _endpoint(args: argparse.Namespace) -> tuple[str, int, int, int]:
    """``(host, port, rank, world_size)``: ``--store HOST:PORT --rank R --world-size N``,
    or the variables torchrun (any ``env://`` launcher) sets, read as ``env://`` reads them."""
    explicit = (args.store, args.rank, args.world_size)
    if all(value is None for value in explicit):
        if not os.environ.get("MASTER_ADDR"):
            raise SettingError(f"MASTER_ADDR is not set: {_HOW_TO_RUN}")
        host, port = os.environ["MASTER_ADDR"], _env_int("MASTER_PORT")
        rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    elif any(value is None for value in explicit):
        raise SettingError("--store, --rank and --world-size go together: pass all three, or none under torchrun.")
    else:
        host, _, port_text = args.store.rpartition(":")
        if not host or not port_text.isdigit():
            raise SettingError(f"--store {args.store[:60]!r} is not HOST:PORT.")
        port, rank, world_size = int(port_text), args.rank, args.world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise SettingError(f"rank {rank} is outside a world of size {world_size}.")
    if not 0 < port < 2**16:
        raise SettingError(f"port {port} is not a TCP port (1-65535).")
    return host, port, rank, world_size


def _timeout(seconds: float) -> timedelta:
    """``--timeout``: finite, above 0 and at most a year, which every store's millisecond timeout holds."""
    if not 0 < seconds <= MAX_TIMEOUT_S:  # also false for NaN
        raise SettingError(
            f"--timeout {seconds:g} is not a number of seconds above 0 and at most {MAX_TIMEOUT_S:.0f} (a year)."
        )
    return timedelta(seconds=seconds)


def _check_backend(backend: str) -> None:
    names = [part.rpartition(":")[2].strip().lower() for part in backend.split(",")]
    if not all(name in dist.Backend.backend_list for name in names):
        known = ", ".join(b for b in dist.Backend.backend_list if b != "undefined")
        raise SettingError(f"--backend {backend[:40]!r} names no registered backend ({known}; or DEVICE:BACKEND,...).")


def _print_report(report: _preflight.Report, as_json: bool) -> None:
    """Only rank 0 prints the table (or the JSON object) on stdout; the others
    print the verdict on stderr when the job would not start."""
    if report.rank == 0:
        print(json.dumps(report.obj, sort_keys=True) if as_json else report.text, flush=True)
    elif report.exit_code != _preflight.EXIT_START:
        print(report.text, file=sys.stderr, flush=True)


def _run_preflight(args: argparse.Namespace) -> int:
    """Validate every setting before the store is touched, then connect as
    ``env://`` does (under torchrun the agent hosts the store, otherwise rank 0;
    rank 0 does not wait for every rank to connect, so that the check names a
    rank that never comes) and run the preflight. A broken store is one line and exit 1."""
    host, port, rank, world_size = _endpoint(args)
    timeout = _timeout(args.timeout)
    check_mode()
    version_range(C10D)
    version_range(RPC)  # the same settings the node check validates
    _check_backend(args.backend)
    hosts_store = rank == 0 and os.environ.get(AGENT_STORE_ENV) != "True"
    try:
        store = TCPStore(host, port, world_size, hosts_store, timeout, wait_for_workers=False)
        emit = functools.partial(_print_report, as_json=args.json)
        return _preflight.preflight(store, rank, world_size, timeout, args.backend, emit)
    except (RuntimeError, ValueError) as e:  # the store failed, or held something unreadable
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        message = f"protocol version preflight on rank {rank}: {first_line}"
        if args.json and rank == 0:
            print(json.dumps({"error": message, "exit_code": _preflight.EXIT_NO_START}, sort_keys=True))
        print(f"error: {message}", file=sys.stderr)
        return _preflight.EXIT_NO_START


def main(argv: Sequence[str] | None = None) -> int:
    """Print what this node announces, or run the preflight.

    Args:
        argv: the command line without the program name; ``sys.argv[1:]`` when ``None``.

    Returns:
        The exit code: 0, or 1 when the preflight finds the job would not start;
        2 on a bad setting (with ``--json``, also as ``{"error": ...}`` on stdout,
        so tooling always gets JSON).
    """
    parser = argparse.ArgumentParser(
        prog="python -m torch.distributed._protocol_version",
        description="Show the torch.distributed protocol version this node announces.",
        allow_abbrev=False,  # torchrun's agents leave the check to workers that run --preflight, spelt out
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    preflight = parser.add_argument_group(
        "preflight", "run the check of init_process_group across the job (under torchrun, or with "
        "--store, --rank and --world-size) without building a backend; every rank exits 0 when "
        "the job would start, 1 when it would not, 2 on a bad setting"
    )
    preflight.add_argument("--preflight", action="store_true", help="run the preflight")
    preflight.add_argument("--store", metavar="HOST:PORT", help="the store (rank 0 hosts it)")
    preflight.add_argument("--rank", type=int, help="this rank")
    preflight.add_argument("--world-size", type=int, help="the number of ranks")
    preflight.add_argument("--timeout", type=float, default=120.0, help="seconds (default: 120)")
    preflight.add_argument("--backend", default="gloo", help="the job's backend (default: gloo)")
    args = parser.parse_args(argv)
    if not args.preflight and (args.store, args.rank, args.world_size) != (None, None, None):
        parser.error("--store, --rank and --world-size are options of --preflight")
    try:
        if args.preflight:
            return _run_preflight(args)
        build = describe_build()
    except SettingError as e:
        if args.json:
            print(json.dumps({"error": str(e)}, sort_keys=True))
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_SETTING
    if args.json:
        print(json.dumps(build, sort_keys=True))
    else:
        _print_text(build)
    return 0
