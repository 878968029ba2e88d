# Owner(s): ["oncall: distributed"]
"""The guardrail's rollout on a backend that leaves no trace in the store at init.

NCCL writes nothing to the store when it is built, so a rank without the check
cannot be told from a late one. A plugin backend stands in for it (gloo under a
prefix of its own: real processes, a real TCPStore, a real all_reduce). A rank
with ``TORCH_DISTRIBUTED_PROTOCOL_CHECK=off`` takes the path of a build without
the check: the hook returns before any store traffic. Without a trace there is no
evidence of such a rank, so a ``warn`` rank waits for the ranks it has not heard
from only its grace period (here 1 s, the cap): rank 0 judges without them, names
them and records no version; a rank other than 0 waits that long for rank 0 to
show up, and judges alone if it does not. In ``error`` a rank waits to its timeout
and names the rank. A rank that comes after rank 0 reached its verdict without it
joins a pass if it speaks the negotiated version, and fails at once after a
timeout.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any
from collections.abc import Mapping

import torch.distributed as dist
from torch.distributed._protocol_version import get_group_protocol_version
from torch.testing._internal.common_utils import find_free_port, run_tests, TestCase
from torch.testing._internal.distributed.protocol_version_utils import (
    WarningCollector,
    CHECK_MODE_ENV,
    register_traceless_backend,
    VERSION_OVERRIDE_ENV,
    RankResult,
    SLACK_S,
    spawn_ranks,
)


GRACE_S = 1.0  # min(1 s, timeout / 10) for every timeout used here
WORLD = 3


def traceless_init(
    rank: int, world_size: int, port: int, timeout_s: float, delays: Mapping[int, float], hosted: bool = False
) -> dict[str, Any]:
    """Every rank connects, then arrives at ``init_process_group`` ``delays[rank]``
    seconds after the others are connected; one all_reduce. Returns how long init
    took on this rank and what the guardrail logged. Rank 0 hosts the store unless
    it is ``hosted`` elsewhere (by the test, so it outlives every rank)."""
    import torch

    store = dist.TCPStore("127.0.0.1", port, world_size, rank == 0 and not hosted, timeout=timedelta(seconds=60))
    backend = register_traceless_backend()
    collect = WarningCollector()
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
    def run_job(
        self, modes: dict[int, dict[str, str]], timeout_s: float = 60.0, delays: Mapping[int, float] | None = None,
        port: int | None = None,
    ) -> list[RankResult]:
        """``port``: a store the test hosts; by default rank 0 hosts one."""
        hosted = port is not None
        return spawn_ranks(
            traceless_init, WORLD, args=(port if hosted else find_free_port(), timeout_s, dict(delays or {}), hosted),
            rank_env=modes, timeout=timeout_s + max(dict(delays or {}).values(), default=0.0) + 2 * SLACK_S,
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
        """Rank 0 never shows up in the check: each warn rank waits its grace
        period for it, judges alone, names rank 0 and records no version."""
        results = self.run_job(_modes(r0="off", r1="warn", r2="warn"))
        for result in results[1:]:
            self.assert_ran_within_grace(result)
            self.assertIn(
                "judged without rank 0, not heard from within the grace period of 1s (not started, still starting, "
                "exited, or a build without the check on a backend that leaves no trace in the store); the job goes on",
                result.value["warnings"],
            )
            self.assertIsNone(result.value["negotiated"])  # rank 0 may not speak it
        self.assertTrue(results[0].ok, results[0])
        self.assertEqual(results[0].value["warnings"], "")

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
            "rank 2 arrived after rank 0 had reached its verdict without it; it speaks protocol version 1, which the "
            "others negotiated, and goes on", late["warnings"],
        )

    def test_a_late_error_rank_beside_a_warn_rank_0_goes_on(self) -> None:
        """The state of a cluster switching from warn to error: the late error
        rank takes the verdict it came too late for, as stock would go on."""
        results = self.run_job(_modes(r0="warn", r1="warn", r2="error"), delays={2: 3.0})
        for result in results:
            self.assertTrue(result.ok, result)
        self.assertIn("rank 2 arrived after rank 0 had reached its verdict without it; it speaks protocol version 1",
                      results[2].value["warnings"])

    def test_a_late_rank_that_does_not_speak_the_negotiated_version_says_so(self) -> None:
        warn = self.run_job(_modes({2: 2}, r0="warn", r1="warn", r2="warn"), delays={2: 3.0})
        self.assertTrue(warn[2].ok, warn[2])
        self.assertIn("the others negotiated protocol version 1, which this rank does not speak", warn[2].value["warnings"])
        error = self.run_job(_modes({2: 2}, r0="warn", r1="warn", r2="error"), timeout_s=6.0, delays={2: 3.0})
        self.assertEqual(error[2].error_type, "ProtocolVersionError", error[2])
        self.assertIn("which this rank does not speak", error[2].error)

    def test_a_late_rank_after_a_timeout_fails_at_once(self) -> None:
        """Rank 0 (error) gives up on rank 2 at its timeout; rank 2 comes later and
        fails at once with an account of that give-up, not at its own timeout.
        The test hosts the store, so that it outlives rank 0."""
        server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
        timeout_s, delay_s = 4.0, 5.0
        results = self.run_job(_modes(r0="error", r1="error", r2="error"), timeout_s=timeout_s, delays={2: delay_s},
                               port=server.port)
        for result in results[:2]:
            self.assertEqual(result.error_type, "DistStoreError", result)
            self.assertIn("rank 2 never published a protocol version", result.error)
        late = results[2]
        self.assertEqual(late.error_type, "DistStoreError", late)
        self.assertIn(
            "rank 2 arrived after rank 0 had reached its verdict without it: rank 0 gave up waiting for it", late.error
        )
        self.assertIn(f"timed out after {timeout_s:g}s (backend pvtraceless): rank 2 never published", late.error)
        # At once: about delay_s - timeout_s after rank 0 gave up; waiting for its own
        # timeout would take it to about delay_s after that.
        self.assertLess(late.finished - results[0].finished, (delay_s - timeout_s) + 2.0, results)

    def test_a_warn_rank_that_went_on_before_rank_0_is_judged_from_its_payload(self) -> None:
        """Rank 1 (warn) hears nothing from rank 0 within its grace period and goes
        on alone; the payload it published stays in its slot, and the late rank 0
        (error) judges it from there: it refuses a rank 1 on another build, as soon
        as rank 2 has read the verdict (rank 1 counted itself out as it went on)."""
        timeout_s = 10.0
        mixed = self.run_job(_modes({1: 2}, r0="error", r1="warn", r2="error"), timeout_s=timeout_s, delays={0: 2.5})
        for result in (mixed[0], mixed[2]):
            self.assertEqual(result.error_type, "ProtocolVersionError", result)
            self.assertIn("protocol version 2: rank 1 on host", result.error)
        self.assertLess(abs(mixed[0].finished - mixed[2].finished), timeout_s / 2, mixed)

    def test_a_warn_rank_that_went_on_before_rank_0_does_not_hold_rank_0(self) -> None:
        """As above with matching builds: every rank runs, and the late rank 0 does
        not wait for rank 1, which went on, to read its verdict (rank 1 counted
        itself out as it went on): waiting to its timeout (60 s here) would hold
        ranks 1 and 2 in the backend until theirs."""
        matching = self.run_job(_modes(r0="error", r1="warn", r2="error"), delays={0: 2.5})
        for result in matching:
            self.assertTrue(result.ok, result)
            self.assertEqual(result.value["sum"], float(WORLD))
            self.assertNotIn("without the protocol version check", result.value["warnings"])
        self.assertLessEqual(matching[0].value["init_s"], GRACE_S + SLACK_S, matching[0])
        self.assertIn("judged without rank 0", matching[1].value["warnings"])

    def test_mixed_modes_each_rank_waits_as_its_own_mode_says(self) -> None:
        """Rank 0 on error waits for the silent rank to its timeout. The warn rank
        sees rank 0 in the check, so it waits for rank 0's verdict (a timeout), goes
        on without a verdict as warn does, and waits in the backend for rank 0,
        which has failed: as stock, it fails there."""
        results = self.run_job(_modes(r0="error", r1="warn", r2="off"), timeout_s=6.0)
        self.assertEqual(results[0].error_type, "DistStoreError", results[0])
        self.assertIn("rank 2 never published", results[0].error)
        self.assertFalse(results[1].ok, results[1])
        self.assertNotIn("protocol version", results[1].error)  # the backend's own error, not the check's


if __name__ == "__main__":
    run_tests()
