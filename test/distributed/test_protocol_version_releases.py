# Owner(s): ["oncall: distributed"]
"""A rolling update across torch releases, with real builds: ranks on the guardrail over
torch 2.13.0 (the pinned base, ``.venv``) beside ranks on the guardrail over torch 2.14.1
(``.venv-2.14``, which ``make test-long`` creates). Both releases speak protocol version 1
(stock 2.13.0 and 2.14.1 run gloo collectives together), so the guardrail lets the update
through; a 2.14.1 that announced version 2 would be refused on every rank, naming it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from torch.testing._internal.common_utils import find_free_port, run_tests, TestCase
from torch.testing._internal.distributed.protocol_version_utils import (
    GUARDRAIL_ENVS,
    MISMATCH,
    NEXT_VENV,
    VERSION_OVERRIDE_ENV,
)


BASE_PY = Path(sys.executable)
NEXT_PY = NEXT_VENV / "bin" / "python"
# One rank of a 2-rank gloo job on env://; prints what it did as one JSON line.
RANK = """\
import datetime, importlib.metadata, json, os, sys, torch, torch.distributed as dist
from torch.distributed import _protocol_version as pv
out = {"torch": importlib.metadata.version("torch")}
try:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    tensor = torch.ones(1)
    dist.all_reduce(tensor)
    out.update(ok=True, sum=tensor.item(), negotiated=pv.get_group_protocol_version())
    dist.destroy_process_group()
except Exception as e:
    out.update(ok=False, error_type=type(e).__name__, error=str(e))
print(json.dumps(out), flush=True)
"""


def run_ranks(pythons: list[Path], commands: list[list[str]], envs: list[dict[str, str]]) -> list[tuple[int, str]]:
    """Start one process per rank, each with its own Python; their exit codes and output, by rank."""
    clean = {k: v for k, v in os.environ.items() if k not in GUARDRAIL_ENVS}
    port = str(find_free_port())
    procs = [
        subprocess.Popen(
            [str(python), *command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**clean, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank),
                 "WORLD_SIZE": str(len(pythons)), **env},
        )
        for rank, (python, command, env) in enumerate(zip(pythons, commands, envs))
    ]
    try:
        outputs = [proc.communicate(timeout=120)[0] for proc in procs]
        return [(proc.returncode, output) for proc, output in zip(procs, outputs)]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


class TestRollingUpdate(TestCase):
    def setUp(self) -> None:
        super().setUp()
        if not NEXT_PY.exists():
            self.skipTest(f"no torch 2.14.1 environment at {NEXT_PY}: make test-long creates it")

    def job(self, pythons: list[Path], envs: list[dict[str, str]] | None = None) -> list[dict[str, Any]]:
        outputs = run_ranks(pythons, [["-c", RANK]] * len(pythons), envs or [{}] * len(pythons))
        return [json.loads(output.strip().splitlines()[-1]) for _, output in outputs]

    def test_2_13_and_2_14_1_run_together_in_either_order(self) -> None:
        for pythons in ([BASE_PY, NEXT_PY], [NEXT_PY, BASE_PY]):
            with self.subTest(first=str(pythons[0])):
                outcomes = self.job(pythons)
                self.assertEqual(sorted(o["torch"].split("+")[0] for o in outcomes), ["2.13.0", "2.14.1"])
                for outcome in outcomes:
                    self.assertEqual((outcome.get("sum"), outcome.get("negotiated")), (2.0, 1), outcome)

    def test_2_14_1_announcing_version_2_is_refused_on_every_rank_naming_it(self) -> None:
        for pythons in ([BASE_PY, NEXT_PY], [NEXT_PY, BASE_PY]):
            with self.subTest(first=str(pythons[0])):
                envs = [{VERSION_OVERRIDE_ENV: "2"} if p == NEXT_PY else {} for p in pythons]
                next_rank = pythons.index(NEXT_PY)
                outcomes = self.job(pythons, envs)
                for outcome in outcomes:
                    self.assertEqual(outcome.get("error_type"), "ProtocolVersionError", outcome)
                    self.assertIn(MISMATCH, outcome["error"])
                    self.assertRegex(outcome["error"], rf"protocol version 2: rank {next_rank} on host \S+ "
                                                       rf"\(torch {outcomes[next_rank]['torch']}\)")
                    self.assertIn(f"(torch {outcomes[1 - next_rank]['torch']})", outcome["error"])

    def test_the_preflight_shows_both_releases(self) -> None:
        command = ["-m", "torch.distributed._protocol_version", "--preflight", "--timeout", "60"]
        (code_0, table), (code_1, _) = run_ranks([BASE_PY, NEXT_PY], [command, command], [{}, {}])
        self.assertEqual((code_0, code_1), (0, 0), table)
        # Rank 0 prints a row per rank: host, rank, protocol version, torch version, commit, python, backends.
        self.assertRegex(table, r"\n\S+ +0 +1 +2\.13\.0\S* ")
        self.assertRegex(table, r"\n\S+ +1 +1 +2\.14\.1\S* ")
        self.assertIn("the 2 ranks negotiate protocol version 1.\nThe job would start.", table)


if __name__ == "__main__":
    run_tests()
