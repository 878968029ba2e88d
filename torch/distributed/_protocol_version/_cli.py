"""``python -m torch.distributed._protocol_version [--json]``: what this node
announces, checked before it joins a job."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import torch
from torch.distributed._protocol_version._families import C10D
from torch.distributed._protocol_version._settings import check_mode, overrides_set, SettingError, version_range


def describe_build() -> dict[str, Any]:
    """What this node will announce; raises ``SettingError`` on a bad setting,
    in every mode, as ``init_process_group`` does."""
    mode = check_mode()
    minimum, version = version_range(C10D)
    return {
        "protocol_version": version,
        "min_protocol_version": minimum,
        "torch_version": torch.__version__,
        "check_mode": mode,
        "overrides": {name: os.environ[name] for name in overrides_set(C10D)},
    }


def _print_text(build: dict[str, Any]) -> None:
    overrides = ", ".join(f"{k}={v!r}" for k, v in build["overrides"].items()) or "none"
    print(f"protocol version:     {build['protocol_version']}")
    print(f"minimum accepted:     {build['min_protocol_version']}")
    print(f"torch version:        {build['torch_version']}")
    print(f"check mode:           {build['check_mode']}")
    print(f"overrides in effect:  {overrides}")


def main(argv: Sequence[str] | None = None) -> int:
    """Print this build's protocol versions and settings; exit 2 on a bad setting
    (with ``--json``, as ``{"error": ...}`` on stdout, so tooling always gets JSON)."""
    parser = argparse.ArgumentParser(
        prog="python -m torch.distributed._protocol_version",
        description="Show the torch.distributed protocol version this node announces.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
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
