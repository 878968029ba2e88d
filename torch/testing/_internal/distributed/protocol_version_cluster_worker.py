"""The job of the cluster tests and demo: one worker per host, under torchrun.

    python -m torch.distributed.run ... protocol_version_cluster_worker.py --report-dir DIR

Each host runs it with its own torch (the fork, stock torch, another build of
the fork), so it needs nothing but torch, and asks for the guardrail's API only
where the build has it. It appends what happened, as JSON lines, to
``DIR/<hostname>.jsonl``, each line with its rank, host, attempt (torchrun's
restart count), pid and time:

* ``launched``, first thing, before ``import torch``: a worker process exists
  (the trace that proves a worker started, or, by its absence, that none did);
* ``start``: the torch distribution, whether the build has the check;
* then, by default, gloo is initialized through torchrun's ``env://`` and
  ``rank + 1`` all_reduced: ``done`` (sum, negotiated version) or
  ``init_failed`` (the error; the exception still propagates, so torchrun sees
  the failure as it would in a job), the last two with when init began;
* with ``--no-init`` the worker never calls ``init_process_group`` (a job that
  talks only through its own channels): ``done`` with ``init: false``;
* with ``--fail-on-attempt N``, attempt ``N`` exits 1 right after ``start``
  (``failed_on_purpose``), so that torchrun restarts the workers. Before
  init, not after: torch 2.13's agents keep the TCPStore they share with the
  workers across restarts, with no prefix per attempt, so a worker of the next
  attempt may read gloo's addresses of the last one and fail in connectFullMesh
  ("Connection refused"), on stock torch as well (4 of 6 restarts here);
* with ``--check-mode MODE``, the worker's own ``TORCH_DISTRIBUTED_PROTOCOL_CHECK``
  is ``MODE`` whatever its agent's was (a job whose launcher runs no check);
* with ``--backend traceless``, the job's backend is a plugin that leaves no key
  in the store before it starts, as NCCL at init (gloo under a prefix of its own).
"""

import os
import socket
import sys
import time


def _report(report_dir, event, **fields):
    fields.update(
        event=event,
        rank=int(os.environ["RANK"]),
        host=socket.gethostname(),
        attempt=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        pid=os.getpid(),
        time=time.time(),
    )
    import json

    with open(os.path.join(report_dir, f"{socket.gethostname()}.jsonl"), "a") as out:
        out.write(json.dumps(fields) + "\n")


def _report_dir():
    """``--report-dir``'s value, read before argparse and torch are imported."""
    for i, arg in enumerate(sys.argv):
        if arg == "--report-dir" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
        if arg.startswith("--report-dir="):
            return arg.partition("=")[2]
    raise SystemExit("protocol_version_cluster_worker.py: --report-dir DIR is required")


# First thing: the worker process exists.
_report(_report_dir(), "launched")

import argparse
import importlib.metadata
import importlib.util
from datetime import timedelta
from pathlib import Path


CHECK_MODULE = "torch.distributed._protocol_version"
CHECK_MODE_ENV = "TORCH_DISTRIBUTED_PROTOCOL_CHECK"  # a plain string: stock torch runs this file too


def _wait_for(path: Path) -> None:
    while not path.exists():
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--report-dir", type=Path, required=True)
    parser.add_argument("--init-timeout", type=float, help="seconds (default: torch's)")
    parser.add_argument("--hold", type=Path, help="wait for this file to exist before init")
    parser.add_argument("--no-init", action="store_true", help="never call init_process_group")
    parser.add_argument("--fail-on-attempt", type=int, help="exit 1 before init on this attempt")
    parser.add_argument("--check-mode", help="this worker's TORCH_DISTRIBUTED_PROTOCOL_CHECK")
    parser.add_argument("--backend", choices=["gloo", "traceless"], default="gloo")
    args = parser.parse_args()
    if args.check_mode is not None:
        os.environ[CHECK_MODE_ENV] = args.check_mode

    import torch
    import torch.distributed as dist

    has_check = importlib.util.find_spec(CHECK_MODULE) is not None
    if args.backend == "traceless":
        dist.Backend.register_backend(args.backend, lambda store, rank, size, timeout: dist.ProcessGroupGloo(
            dist.PrefixStore(args.backend, store), rank, size, timeout), devices=["cpu"])
    # The distribution's version carries the fork's label (2.13.0+cpu.protocolv2);
    # torch.__version__ is upstream's and the same in every build.
    distribution = importlib.metadata.version("torch")
    _report(args.report_dir, "start", distribution=distribution, has_check=has_check)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if args.fail_on_attempt is not None and attempt == args.fail_on_attempt:
        _report(args.report_dir, "failed_on_purpose")
        sys.exit(1)
    if args.hold is not None:
        _wait_for(args.hold)
    if args.no_init:
        tensor = torch.tensor([float(int(os.environ["RANK"]) + 1)])
        _report(args.report_dir, "done", init=False, sum=tensor.item(), negotiated=None)
    else:
        kwargs = {} if args.init_timeout is None else {"timeout": timedelta(seconds=args.init_timeout)}
        began = time.time()
        try:
            dist.init_process_group(args.backend, **kwargs)
        except Exception as e:
            _report(args.report_dir, "init_failed", began=began, error_type=type(e).__name__, error=str(e))
            raise
        tensor = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(tensor)
        negotiated = None
        if has_check:
            from torch.distributed._protocol_version import get_group_protocol_version

            negotiated = get_group_protocol_version()
        _report(args.report_dir, "done", init=True, began=began, sum=tensor.item(), negotiated=negotiated)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
