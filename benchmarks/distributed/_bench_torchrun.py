"""Benchmark 6: what a node without the check costs a torchrun job's start.

What runs. Two real ``torchrun`` processes on this host, one per node, join one
c10d rendezvous on a free port (one worker each). Each worker inits a plugin
backend that leaves no key in the store before it starts (gloo under a prefix of
its own, standing in for NCCL), all_reduces once and prints the wall-clock time.
Two jobs alternate in every repetition, in alternating order:

* all stock: both nodes on stock torch (``.venv-stock``);
* one stock: a node on stock torch beside a node on the guardrail at version 1
  (the guardrail's own rollout), the stock node starting first in every other
  repetition.

Figure of a job: from the launch of both torchruns to the last worker's return
from its first all_reduce (interpreter start-up, rendezvous, worker spawn, init).
The added cost is the one-stock job's figure minus the all-stock job's of the same
repetition: the agents' check waits one grace period for the stock agent's role
info, and the workers take the agents' verdict instead of checking again.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence

from torch.testing._internal.common_utils import find_free_port
from torch.testing._internal.distributed.protocol_version_utils import (
    GUARDRAIL_ENVS, run_in_own_session, STOCK_PYTHON,
)

from _bench_common import format_table, median, Target


ALL_STOCK, ONE_STOCK = "all stock", "one stock"
# The bound on what a stock node beside version 1 adds to the job's start.
ADDED_LIMIT_S = 1.5
JOB_BOUND_S = 120.0
WORKER = """\
import time
import torch, torch.distributed as dist
dist.Backend.register_backend("pvtraceless", lambda store, rank, size, timeout: dist.ProcessGroupGloo(
    dist.PrefixStore("traceless", store), rank, size, timeout), devices=["cpu"])
dist.init_process_group("pvtraceless")
dist.all_reduce(torch.ones(1))
print(f"PV_BENCH_READY {time.time()}", flush=True)
dist.destroy_process_group()
"""


def _job(pythons: Sequence[Path], worker: Path) -> float:
    """Seconds from the launch of one torchrun per python to the last worker's first all_reduce."""
    port = find_free_port()
    env = {k: v for k, v in os.environ.items() if k not in GUARDRAIL_ENVS}
    launched = time.time()

    def node(python: Path) -> str:
        cmd = [str(python), "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=bench",
               "--monitor-interval=0.1", str(worker)]
        result, timed_out = run_in_own_session(cmd, JOB_BOUND_S, env)
        if timed_out or result.returncode != 0:
            raise RuntimeError(f"torchrun on {python} failed (timed out: {timed_out}):\n{result.stdout[-3000:]}")
        return result.stdout

    with ThreadPoolExecutor(len(pythons)) as pool:
        outputs = list(pool.map(node, pythons))
    ready = [float(line.split()[-1]) for out in outputs for line in out.splitlines() if "PV_BENCH_READY" in line]
    if len(ready) != len(pythons):
        raise RuntimeError(f"{len(ready)} of {len(pythons)} workers reported:\n{outputs[-1][-3000:]}")
    return max(ready) - launched


@dataclass
class TorchrunResult:
    seconds: dict[str, list[float]] = field(default_factory=lambda: {ALL_STOCK: [], ONE_STOCK: []})

    def added(self) -> list[float]:
        return [one - stock for one, stock in zip(self.seconds[ONE_STOCK], self.seconds[ALL_STOCK])]


def measure(reps: int) -> TorchrunResult:
    if not STOCK_PYTHON.exists():
        raise RuntimeError(f"benchmark 6 needs stock torch at {STOCK_PYTHON} (make test-long builds it)")
    result = TorchrunResult()
    guardrail = Path(sys.executable)
    with tempfile.TemporaryDirectory(prefix="pv-bench-torchrun-") as tmp:
        worker = Path(tmp, "worker.py")
        worker.write_text(WORKER)
        for rep in range(reps):
            jobs = {ALL_STOCK: [STOCK_PYTHON, STOCK_PYTHON],
                    ONE_STOCK: [STOCK_PYTHON, guardrail] if rep % 2 == 0 else [guardrail, STOCK_PYTHON]}
            for variant in (list(jobs) if rep % 2 == 0 else list(jobs)[::-1]):
                result.seconds[variant].append(_job(jobs[variant], worker))
    return result


def table(result: TorchrunResult) -> str:
    rows = [[job, len(s), f"{median(s):.2f}", f"{min(s):.2f}-{max(s):.2f}"] for job, s in result.seconds.items()]
    added = result.added()
    rows.append(["added", len(added), f"{median(added):+.2f}", f"{min(added):+.2f}-{max(added):+.2f}"])
    return format_table(["job", "runs", "start s (median)", "range"], rows)


def targets(result: TorchrunResult) -> list[Target]:
    added = median(result.added())
    return [Target("a stock node beside version 1 under torchrun, added to the job's start (median)",
                   f"{added:+.2f} s", f"<= {ADDED_LIMIT_S} s", added <= ADDED_LIMIT_S)]
