# Owner(s): ["oncall: distributed"]
"""The guardrail's rollout on a backend that leaves no trace in the store at init.

NCCL writes nothing to the store when it is built, so a rank without the check
cannot be told from a late one. A plugin backend stands in for it (gloo under a
prefix of its own: real processes, a real TCPStore, a real all_reduce). A rank
with ``TORCH_DISTRIBUTED_PROTOCOL_CHECK=off`` takes the path of a build without
the check: the hook returns before any store traffic. In ``warn`` the check
observes and never blocks: a warn rank waits at most its grace period (here 1 s,
the cap) and names what it did not hear from; in ``error`` it waits to its
timeout and names the rank.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any, Mapping

import torch.distributed as dist
from torch.distributed._protocol_version import get_group_protocol_version
from torch.testing._internal.common_utils import find_free_port, run_tests, TestCase
from torch.testing._internal.distributed.protocol_version_utils import (
    CHECK_MODE_ENV,
    register_traceless_backend,
    VERSION_OVERRIDE_ENV,
    RankResult,
    SLACK_S,
    spawn_ranks,
)


GRACE_S = 1.0  # min(1 s, timeout / 10) for every timeout used here
WORLD = 3


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def traceless_init(rank: int, world_size: int, port: int, timeout_s: float, delays: Mapping[int, float]) -> dict[str, Any]:
    """Every rank connects, then arrives at ``init_process_group`` ``delays[rank]``
    seconds after the others are connected; one all_reduce. Returns how long init
    took on this rank and what the guardrail logged."""
    import torch

    store = dist.TCPStore("127.0.0.1", port, world_size, rank == 0, timeout=timedelta(seconds=60))
    backend = register_traceless_backend()
    collect = _Collect()
    logging.getLogger("torch.distributed._protocol_version").addHandler(collect)
    store.set(f"connected/{rank}", "1")
    store.wait([f"connected/{r}" for r in range(world_size)])
    time.sleep(delays.get(rank, 0.0))  # the arrival itself is the scenario
    start = time.monotonic()
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    init_s = time.monotonic() - start
    try:
        tensor = torch.ones(1)
        dist.all_reduce(tensor)
        try:
            negotiated = get_group_protocol_version()
        except RuntimeError:
            negotiated = None
        return {"init_s": init_s, "sum": tensor.item(), "warnings": "\n".join(collect.messages), "negotiated": negotiated}
    finally:
        dist.destroy_process_group()


def _modes(versions: Mapping[int, int] | None = None, **modes: str) -> dict[int, dict[str, str]]:
    """``_modes(r0="warn")`` -> each rank's check mode; ``versions`` the ranks
    that run a build speaking only another version."""
    env = {int(name[1:]): {CHECK_MODE_ENV: mode} for name, mode in modes.items()}
    for rank, version in (versions or {}).items():
        env[rank][VERSION_OVERRIDE_ENV] = str(version)
    return env


class TestWarnOnATracelessBackend(TestCase):
    def run_job(self, modes: dict[int, dict[str, str]], timeout_s: float = 60.0, delays: Mapping[int, float] | None = None) -> list[RankResult]:
        return spawn_ranks(
            traceless_init, WORLD, args=(find_free_port(), timeout_s, dict(delays or {})), rank_env=modes,
            timeout=timeout_s + 2 * SLACK_S,
        )

    def assert_ran_within_grace(self, result: RankResult) -> None:
        self.assertTrue(result.ok, result)
        self.assertEqual(result.value["sum"], float(WORLD))
        self.assertLessEqual(result.value["init_s"], GRACE_S + 1.0, result)

    def test_warn_beside_a_rank_without_the_check_runs_within_the_grace_period(self) -> None:
        results = self.run_job(_modes(r0="warn", r1="warn", r2="off"))
        for result in results[:2]:
            self.assert_ran_within_grace(result)
            self.assertRegex(result.value["warnings"], r"judged without rank 2, not heard from within the grace period of 1s")
            self.assertIsNone(result.value["negotiated"])  # rank 2 may not speak it
        self.assertTrue(results[2].ok, results[2])
        self.assertEqual(results[2].value["warnings"], "")

    def test_warn_beside_rank_0_without_the_check_runs_within_the_grace_period(self) -> None:
        results = self.run_job(_modes(r0="off", r1="warn", r2="warn"))
        for result in results[1:]:
            self.assert_ran_within_grace(result)
            self.assertIn("rank 0, which collects every rank's version, has not opened the check", result.value["warnings"])
            self.assertIn("continuing without a verdict", result.value["warnings"])

    def test_error_beside_a_rank_without_the_check_names_it_at_the_timeout(self) -> None:
        results = self.run_job(_modes(r0="error", r1="error", r2="off"), timeout_s=6.0)
        for result in results[:2]:
            self.assertEqual(result.error_type, "DistStoreError", result)
            self.assertIn("rank 2 never published a protocol version", result.error)
            self.assertIn("a build without the check on a backend that leaves no trace", result.error)
            self.assertLess(result.finished - result.started, 6.0 + SLACK_S)

    def test_a_rank_arriving_after_the_verdict_goes_on(self) -> None:
        results = self.run_job(_modes(r0="warn", r1="warn", r2="warn"), delays={2: 3.0})
        for result in results:
            self.assertTrue(result.ok, result)
            self.assertEqual(result.value["sum"], float(WORLD))
        self.assertIn("judged without rank 2", results[0].value["warnings"])
        late = results[2].value
        self.assertLessEqual(late["init_s"], GRACE_S + 1.0, results[2])
        self.assertIn(
            "rank 2 arrived after rank 0 had judged the check without it; it speaks protocol version 1, which the "
            "others negotiated, and goes on", late["warnings"],
        )

    def test_a_late_error_rank_beside_a_warn_rank_0_goes_on(self) -> None:
        """The state of a cluster switching from warn to error: the late error
        rank takes the verdict it came too late for, as stock would go on."""
        results = self.run_job(_modes(r0="warn", r1="warn", r2="error"), delays={2: 3.0})
        for result in results:
            self.assertTrue(result.ok, result)
        self.assertIn("rank 2 arrived after rank 0 had judged the check without it", results[2].value["warnings"])

    def test_a_late_rank_that_does_not_speak_the_negotiated_version_says_so(self) -> None:
        warn = self.run_job(_modes({2: 2}, r0="warn", r1="warn", r2="warn"), delays={2: 3.0})
        self.assertTrue(warn[2].ok, warn[2])
        self.assertIn("the others negotiated protocol version 1, which this rank does not speak", warn[2].value["warnings"])
        error = self.run_job(_modes({2: 2}, r0="warn", r1="warn", r2="error"), timeout_s=6.0, delays={2: 3.0})
        self.assertEqual(error[2].error_type, "ProtocolVersionError", error[2])
        self.assertIn("which this rank does not speak", error[2].error)

    def test_a_warn_rank_that_went_on_before_rank_0_is_judged_from_its_mark(self) -> None:
        """Rank 1 (warn) leaves its version and goes on before a late rank 0 opens
        the check: rank 0 judges it from that mark, so an error rank 0 refuses a
        rank 1 on another build, and runs a matching one."""
        matching = self.run_job(_modes(r0="error", r1="warn", r2="error"), delays={0: 2.5})
        for result in matching:
            self.assertTrue(result.ok, result)
            self.assertNotIn("without the protocol version check", result.value["warnings"])
        mixed = self.run_job(_modes({1: 2}, r0="error", r1="warn", r2="error"), timeout_s=10.0, delays={0: 2.5})
        for result in (mixed[0], mixed[2]):
            self.assertEqual(result.error_type, "ProtocolVersionError", result)
            self.assertIn("protocol version 2: rank 1 on host", result.error)

    def test_mixed_modes_each_rank_waits_as_its_own_mode_says(self) -> None:
        """Rank 0 on error waits for the silent rank to its timeout; the warn rank
        publishes and leaves the check within its grace period, then waits in the
        backend for rank 0, which has failed: as stock, it fails there."""
        results = self.run_job(_modes(r0="error", r1="warn", r2="off"), timeout_s=6.0)
        self.assertEqual(results[0].error_type, "DistStoreError", results[0])
        self.assertIn("rank 2 never published", results[0].error)
        self.assertFalse(results[1].ok, results[1])
        self.assertNotIn("protocol version", results[1].error)  # the backend's own error, not the check's


if __name__ == "__main__":
    run_tests()
