# Owner(s): ["oncall: distributed"]
"""Upstream's distributed and RPC suites (fixed subsets) behave the same with the hooks.

Runs ``tools/run_upstream_suite.py`` (default subsets: initialisation, groups,
barrier and the main collectives of ``DistributedTest``; ``init_rpc``, calls,
RRefs, shutdown and distributed autograd of the TensorPipe RPC suites) against
the patched ``.venv`` and the stock ``.venv-stock`` at once and checks its verdict. The driver itself refuses to
compare unless the patched torch has the hook and the stock one has not, so
this fails if the hook is removed as well as if it breaks anything upstream
tests. ``make upstream-suite`` runs the whole suite the same way.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from torch.testing._internal.common_utils import run_tests, TestCase
from torch.testing._internal.distributed.protocol_version_utils import REPO_ROOT, run_in_own_session


DRIVER = REPO_ROOT / "tools" / "run_upstream_suite.py"
# The driver kills each suite's runs after 900s; this only guards against the driver itself.
TIMEOUT_S = 1900.0


def run_driver(json_path: Path) -> subprocess.CompletedProcess[str]:
    """Run the driver's default subsets in its own session; kill it all on timeout."""
    cmd = [sys.executable, str(DRIVER), "--json", str(json_path)]
    result, timed_out = run_in_own_session(cmd, TIMEOUT_S)
    if timed_out:
        result.stdout += f"\n(killed after {TIMEOUT_S:g}s)"
    return result


# Tests at the heart of each subset, which must really run, not be skipped.
CORE = {
    "c10d": ["test_get_rank", "test_barrier", "test_all_reduce_sum", "test_broadcast"],
    "rpc": ["test_init_rpc_twice", "test_add", "test_backward_simple"],
}


class UpstreamSuiteSubsetTest(TestCase):
    def test_subsets_match_stock(self) -> None:
        with tempfile.TemporaryDirectory(prefix="upstream-subset-") as tmp:
            json_path = Path(tmp) / "summary.json"
            result = run_driver(json_path)
            self.assertEqual(result.returncode, 0, result.stdout)
            summary = json.loads(json_path.read_text())
        self.assertEqual(summary["selection"], "subset")
        self.assertEqual(sorted(summary["suites"]), sorted(CORE))
        for name, suite in summary["suites"].items():
            patched, stock = suite["environments"]["patched"], suite["environments"]["stock"]
            self.assertEqual(patched["counts"], stock["counts"], result.stdout)
            self.assertGreater(patched["counts"]["passed"], 0, result.stdout)
            self.assertEqual(suite["patched_only_failures"], [], result.stdout)
            self.assertEqual(patched["outcomes"], stock["outcomes"], result.stdout)
            passed = {node.split("::")[-1] for node, outcome in patched["outcomes"].items() if outcome == "passed"}
            for test in CORE[name]:
                self.assertIn(test, passed, f"{name}: {result.stdout}")


if __name__ == "__main__":
    run_tests()
