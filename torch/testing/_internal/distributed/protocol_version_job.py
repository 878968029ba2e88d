"""Small gloo jobs, each run the same way on the fork and on stock torch.

Stock torch is the baseline for every path: ``test/distributed/test_protocol_version_parity.py``
runs this file as a script with the Python of each environment and compares what every
rank did. It imports nothing but torch (with its test helpers) and the standard library,
so stock torch can run it. A list of jobs, run one after the other by one interpreter (torch is imported
once), is read as JSON from argv[1]; each job's rank outcomes are printed as one
line, ``outcomes: <JSON list>``.

    [{"world_size": 3, "started": [0, 1, 2], "delays": {"2": 9.4}, "timeout": 10,
     "init": "tcpstore" | "env" | "hashstore", "env": {"1": {"VAR": "value"}},
     "rank_arg": {"0": 3},  # optional: a wrong rank passed to init_process_group
     "private_ranks": true,  # optional, env:// only: init_process_group(_ranks=...)
     "backend": "nccl", "kwargs": {"device_id": "cpu"}}]  # optional: other arguments
                                    # (a string device_id is made a torch.device)
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import sys
import time
from datetime import timedelta
from typing import Any

from torch.testing._internal.common_utils import find_free_port


def _init(job: dict[str, Any], rank: int, port: int) -> None:
    import torch
    import torch.distributed as dist

    timeout = timedelta(seconds=job["timeout"])
    world_size = job["world_size"]
    rank_arg = int(job.get("rank_arg", {}).get(str(rank), rank))
    backend = job.get("backend", "gloo")
    extra = {"timeout": timeout, **job.get("kwargs", {})}
    if isinstance(extra.get("device_id"), str):
        extra["device_id"] = torch.device(extra["device_id"])
    if job.get("private_ranks"):  # init_process_group's private _ranks names the default group by a hash
        extra["_ranks"] = list(range(world_size))
    if job["init"] == "tcpstore":
        store = dist.TCPStore(
            "127.0.0.1", port, world_size, rank == 0, timeout=timeout, wait_for_workers=False
        )
        dist.init_process_group(backend, store=store, rank=rank_arg, world_size=world_size, **extra)
    elif job["init"] == "hashstore":
        dist.init_process_group(backend, store=dist.HashStore(), rank=rank_arg, world_size=world_size, **extra)
    else:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group(backend, init_method="env://", rank=rank_arg, world_size=world_size, **extra)


def _rank(job: dict[str, Any], rank: int, port: int, results: Any, imported: Any) -> None:
    # Read when called (the guardrail's variables), not at import: the server imported torch.
    os.environ.update(job.get("env", {}).get(str(rank), {}))
    import torch
    import torch.distributed as dist

    # Delays count from the moment every started rank has imported torch, which
    # takes seconds on a busy machine and differs from rank to rank by more than
    # the margin a test near the timeout leaves.
    imported.wait(timeout=float(job.get("wall", 120)))
    started = time.monotonic()
    time.sleep(float(job.get("delays", {}).get(str(rank), 0)))
    outcome: dict[str, Any] = {"rank": rank}
    try:
        _init(job, rank, port)
        tensor = torch.ones(1)
        dist.all_reduce(tensor)
        dist.destroy_process_group()
        outcome.update(ok=True, sum=tensor.item())
    except Exception as e:
        outcome.update(ok=False, error_type=type(e).__name__, error=str(e))
    outcome["seconds"] = round(time.monotonic() - started, 2)
    results.put(outcome)


def _run(ctx: Any, job: dict[str, Any]) -> list[dict[str, Any]]:
    """Start the job's ranks from the fork server, on a port of its own; each rank's outcome, once every one
    reported or the job's wall time passed (the ranks are killed either way)."""
    results = ctx.Queue()
    started = list(job.get("started", range(job["world_size"])))
    imported = ctx.Barrier(len(started))
    port = find_free_port()
    procs = [ctx.Process(target=_rank, args=(job, rank, port, results, imported)) for rank in started]
    for proc in procs:
        proc.start()
    outcomes = []
    deadline = time.monotonic() + float(job.get("wall", 120))
    while len(outcomes) < len(procs) and time.monotonic() < deadline:
        try:
            outcomes.append(results.get(timeout=0.5))
        except queue.Empty:
            continue
    for proc in procs:
        proc.kill()
        proc.join()
    return sorted(outcomes, key=lambda o: o["rank"])


def main() -> None:
    jobs = json.loads(sys.argv[1])
    # Ranks fork from a server that imported torch once, as the tests' own ranks do.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch.distributed"])
    for job in jobs:
        print(f"outcomes: {json.dumps(_run(ctx, job))}", flush=True)


if __name__ == "__main__":
    main()
