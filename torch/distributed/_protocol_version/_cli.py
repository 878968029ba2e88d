"""``python -m torch.distributed._protocol_version [--json]``: what this node
announces, checked before it joins a job; with ``--preflight``, the check of the
whole job, run across the cluster (see :mod:`._preflight`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from torch.distributed._protocol_version import _preflight
from torch.distributed._protocol_version._families import C10D, RPC
from torch.distributed._protocol_version._payload import torch_build
from torch.distributed._protocol_version._settings import check_mode, overrides_set, SettingError, version_range


def describe_build() -> dict[str, Any]:
    """What this node will announce, for each family; raises ``SettingError`` on a
    bad setting, in every mode, as ``init_process_group`` and ``init_rpc`` do.

    The collectives' versions stay at the top level, where the first build put
    them; the RPC family's are under ``"rpc"``.
    """
    mode = check_mode()
    minimum, version = version_range(C10D)
    rpc_minimum, rpc_version = version_range(RPC)
    return {
        "protocol_version": version,
        "min_protocol_version": minimum,
        "rpc": {"protocol_version": rpc_version, "min_protocol_version": rpc_minimum},
        "torch_version": torch_build(),
        "check_mode": mode,
        "overrides": {name: os.environ[name] for family in (C10D, RPC) for name in overrides_set(family)},
    }


def _print_text(build: dict[str, Any]) -> None:
    overrides = ", ".join(f"{k}={v!r}" for k, v in build["overrides"].items()) or "none"
    print(f"protocol version:     {build['protocol_version']}")
    print(f"minimum accepted:     {build['min_protocol_version']}")
    print(f"RPC protocol version: {build['rpc']['protocol_version']}")
    print(f"RPC minimum accepted: {build['rpc']['min_protocol_version']}")
    print(f"torch version:        {build['torch_version']}")
    print(f"check mode:           {build['check_mode']}")
    print(f"overrides in effect:  {overrides}")


def _endpoint(args: argparse.Namespace) -> _preflight.Endpoint:
    """``--store HOST:PORT --rank R --world-size N``, or torchrun's variables."""
    explicit = (args.store, args.rank, args.world_size)
    if all(value is None for value in explicit):
        return _preflight.endpoint_from_env()
    if any(value is None for value in explicit):
        raise SettingError("--store, --rank and --world-size go together: pass all three, or none under torchrun.")
    host, _, port = args.store.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 2**16:
        raise SettingError(f"--store {args.store[:60]!r} is not HOST:PORT.")
    return _preflight.Endpoint(host, int(port), args.rank, args.world_size)


def _print_report(report: _preflight.Report, as_json: bool) -> None:
    """Only rank 0 prints the table (or the JSON object) on stdout; the others
    print the verdict on stderr when the job would not start."""
    if report.rank == 0:
        print(json.dumps(report.obj, sort_keys=True) if as_json else report.text, flush=True)
    elif report.exit_code != _preflight.EXIT_START:
        print(report.text, file=sys.stderr, flush=True)


def _run_preflight(args: argparse.Namespace) -> int:
    """Every rank exits with rank 0's code; a broken store is one line and exit 1."""
    endpoint = _endpoint(args)
    try:
        return _preflight.run(
            endpoint, _preflight.timeout_from_seconds(args.timeout), args.backend, lambda r: _print_report(r, args.json)
        )
    except SettingError:
        raise
    except (RuntimeError, ValueError) as e:  # the store failed, or held something unreadable
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        message = f"protocol version preflight on rank {endpoint.rank}: {first_line}"
        if args.json and endpoint.rank == 0:
            print(json.dumps({"error": message, "exit_code": _preflight.EXIT_NO_START}, sort_keys=True))
        print(f"error: {message}", file=sys.stderr)
        return _preflight.EXIT_NO_START


def main(argv: Sequence[str] | None = None) -> int:
    """Print this build's protocol versions and settings, or run the preflight;
    exit 2 on a bad setting (with ``--json``, as ``{"error": ...}`` on stdout, so
    tooling always gets JSON)."""
    parser = argparse.ArgumentParser(
        prog="python -m torch.distributed._protocol_version",
        description="Show the torch.distributed protocol version this node announces.",
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
        return 2
    if args.json:
        print(json.dumps(build, sort_keys=True))
    else:
        _print_text(build)
    return 0
