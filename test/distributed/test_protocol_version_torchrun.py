# Owner(s): ["oncall: distributed"]
"""The guardrail under a real ``torchrun`` (``python -m torch.distributed.run``).

torchrun is how most jobs start, and it restarts failed workers: a mismatch must
end every attempt quickly with the guardrail's message instead of hanging until
the rendezvous or init timeout, and restarts must not turn it into a hang either.
Each test writes a small training-like script to a temp dir and launches three
workers on one node with a c10d rendezvous on a free port (``--standalone``).
"""

from __future__ import annotations

import itertools
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from torch.distributed._protocol_version import VERSION_OVERRIDE_ENV
from torch.testing._internal.common_utils import (
    instantiate_parametrized_tests,
    parametrize,
    run_tests,
    TestCase,
)
from torch.testing._internal.distributed.protocol_version_utils import (
    GUARDRAIL_ENVS,
    MISMATCH,
    ODD_RANK_ENV,
    run_in_own_session,
)


NPROC = 3
# The workers' init timeout. A check that hangs instead of failing would only end
# here, so the "quick" bounds below stay well under it.
INIT_TIMEOUT_S = 120
# Generous for a shared 2-core machine: one attempt takes ~10s there (three
# interpreters importing torch), a hang takes at least INIT_TIMEOUT_S.
ATTEMPT_BOUND_S = 75.0
ODD_VERSION_ENV = "PV_TEST_ODD_VERSION"

# The worker: the odd local rank (if any) pretends to run another build; every
# rank then inits gloo through env:// (the store torchrun provides) and all_reduces.
WORKER_SCRIPT = f'''\
import os
import time
from datetime import timedelta

if os.environ["LOCAL_RANK"] == os.environ.get("{ODD_RANK_ENV}"):
    os.environ["{VERSION_OVERRIDE_ENV}"] = os.environ["{ODD_VERSION_ENV}"]

import torch
import torch.distributed as dist
from torch.distributed._protocol_version import get_group_protocol_version


def report(what):
    # One write per line: the workers share torchrun's stdout.
    attempt, rank = os.environ["TORCHELASTIC_RESTART_COUNT"], os.environ["RANK"]
    os.write(1, f"worker attempt={{attempt}} rank={{rank}} {{what}}\\n".encode())


report(f"start={{time.time():.3f}}")
try:
    dist.init_process_group("gloo", timeout=timedelta(seconds={INIT_TIMEOUT_S}))
except RuntimeError as e:
    report(f"init failed: {{str(e).splitlines()[0]}}")
    raise
tensor = torch.ones(1)
dist.all_reduce(tensor)
report(f"sum={{tensor.item():g}} negotiated={{get_group_protocol_version()}}")
dist.destroy_process_group()
'''


@dataclass
class Launch:
    returncode: int
    output: str
    wall_s: float

    def worker_lines(self, what: str) -> list[re.Match[str]]:
        """Worker report lines of one kind, e.g. ``start=`` or ``init failed:``.

        Not anchored at a line start: a worker's traceback on the shared stream
        may end without a newline right before a report (each report is one
        atomic write, so it is never split itself)."""
        pattern = rf"worker attempt=(\d+) rank=(\d+) {what}(.*)$"
        return list(re.finditer(pattern, self.output, re.MULTILINE))


class TorchrunProtocolVersionTest(TestCase):
    def setUp(self) -> None:
        super().setUp()
        tmp = tempfile.TemporaryDirectory(prefix="pv-torchrun-")
        self.addCleanup(tmp.cleanup)
        self.script = Path(tmp.name) / "worker.py"
        self.script.write_text(WORKER_SCRIPT)

    def torchrun(self, odd: tuple[int, int] | None = None, max_restarts: int = 0,
                 timeout: float = 100.0) -> Launch:
        """Launch ``NPROC`` workers; ``odd`` = (local rank, version) it overrides.

        torchrun runs in its own session so that on a timeout the whole tree
        (agent and workers) is killed, and anything left afterwards too.
        """
        env = {k: v for k, v in os.environ.items() if k not in GUARDRAIL_ENVS}
        if odd is not None:
            env.update({ODD_RANK_ENV: str(odd[0]), ODD_VERSION_ENV: str(odd[1])})
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={NPROC}", "--monitor-interval=0.1",
            f"--max-restarts={max_restarts}", str(self.script),
        ]
        started = time.monotonic()
        result, timed_out = run_in_own_session(cmd, timeout, env)
        if timed_out:
            self.fail(f"torchrun still running after {timeout:g}s (hang):\n{result.stdout[-4000:]}")
        return Launch(result.returncode, result.stdout, time.monotonic() - started)

    def test_matching_versions_succeed(self) -> None:
        launch = self.torchrun()
        self.assertEqual(launch.returncode, 0, launch.output[-4000:])
        done = launch.worker_lines("sum=")
        self.assertEqual(sorted(int(m[2]) for m in done), list(range(NPROC)), launch.output)
        for match in done:
            self.assertEqual(match[3], f"{NPROC} negotiated=1")
        self.assertNotIn(MISMATCH, launch.output)

    @parametrize("odd_rank", [0, NPROC - 1])
    def test_one_rank_on_another_version_fails_the_job(self, odd_rank: int) -> None:
        launch = self.torchrun(odd=(odd_rank, 2))
        self.assertNotEqual(launch.returncode, 0, launch.output[-4000:])
        self.assertLess(launch.wall_s, ATTEMPT_BOUND_S, launch.output[-4000:])
        failed = launch.worker_lines("init failed: ")
        # Every rank, the odd one included, fails in init with the same message.
        self.assertEqual(sorted(int(m[2]) for m in failed), list(range(NPROC)), launch.output)
        for match in failed:
            self.assertIn(MISMATCH, match[3])
        self.assertEqual(launch.worker_lines("sum="), [])

    def test_restarts_fail_the_same_way_each_time(self) -> None:
        restarts = 2
        launch = self.torchrun(odd=(NPROC - 1, 2), max_restarts=restarts,
                               timeout=(restarts + 1) * ATTEMPT_BOUND_S)
        self.assertNotEqual(launch.returncode, 0, launch.output[-4000:])
        failed = launch.worker_lines("init failed: ")
        attempts = sorted({int(m[1]) for m in failed})
        self.assertEqual(attempts, list(range(restarts + 1)), launch.output)
        self.assertEqual(len(failed), (restarts + 1) * NPROC, launch.output)
        self.assertTrue(all(MISMATCH in m[3] for m in failed), launch.output)
        # Each attempt is quick: consecutive attempts start within the bound.
        first_start = {}
        for m in launch.worker_lines("start="):
            first_start.setdefault(int(m[1]), float(m[3]))
        starts = [first_start[a] for a in attempts]
        gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
        self.assertTrue(all(gap < ATTEMPT_BOUND_S for gap in gaps), gaps)
        self.assertLess(launch.wall_s, (restarts + 1) * ATTEMPT_BOUND_S)


instantiate_parametrized_tests(TorchrunProtocolVersionTest)


if __name__ == "__main__":
    run_tests()
