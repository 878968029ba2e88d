"""The job of the cluster tests and demo: one gloo worker per host, under torchrun.

    python -m torch.distributed.run ... protocol_version_cluster_worker.py --report-dir DIR

Each host runs it with its own torch (the fork, stock torch, another build of
the fork), so it needs nothing but torch, and asks for the guardrail's API only
where the build has it. It initializes gloo through torchrun's ``env://``,
all_reduces ``rank + 1`` and appends what happened, as JSON lines, to
``DIR/<hostname>.jsonl``: ``start`` (rank, torch distribution, whether the build
has the check), then ``done`` (sum, negotiated version) or ``init_failed`` (the
error); each with the time, and the last two with when init began. The
exception still propagates, so torchrun sees the failure as it would in a job.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any


CHECK_MODULE = "torch.distributed._protocol_version"


def _report(report_dir: Path, event: str, **fields: Any) -> None:
    fields.update(event=event, rank=int(os.environ["RANK"]), host=socket.gethostname(), time=time.time())
    with open(report_dir / f"{socket.gethostname()}.jsonl", "a") as out:
        out.write(json.dumps(fields) + "\n")


def _wait_for(path: Path) -> None:
    while not path.exists():
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--report-dir", type=Path, required=True)
    parser.add_argument("--init-timeout", type=float, help="seconds (default: torch's)")
    parser.add_argument("--hold", type=Path, help="wait for this file to exist before init")
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    has_check = importlib.util.find_spec(CHECK_MODULE) is not None
    # The distribution's version carries the fork's label (2.13.0+cpu.protocolv2);
    # torch.__version__ is upstream's and the same in every build.
    distribution = importlib.metadata.version("torch")
    _report(args.report_dir, "start", distribution=distribution, has_check=has_check)
    if args.hold is not None:
        _wait_for(args.hold)
    kwargs = {} if args.init_timeout is None else {"timeout": timedelta(seconds=args.init_timeout)}
    began = time.time()
    try:
        dist.init_process_group("gloo", **kwargs)
    except Exception as e:
        _report(args.report_dir, "init_failed", began=began, error_type=type(e).__name__, error=str(e))
        raise
    tensor = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(tensor)
    negotiated = None
    if has_check:
        from torch.distributed._protocol_version import get_group_protocol_version

        negotiated = get_group_protocol_version()
    _report(args.report_dir, "done", began=began, sum=tensor.item(), negotiated=negotiated)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
