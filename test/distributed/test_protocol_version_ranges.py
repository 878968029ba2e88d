# Owner(s): ["oncall: distributed"]
"""Version ranges, the negotiated group version, the framework helper and the CLI."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import itertools
import json
import os
import platform
import subprocess
import sys
from datetime import timedelta
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
from hypothesis import assume, given, settings, strategies as st
from torch.distributed import _protocol_version as pv
from torch.distributed._protocol_version._settings import version_range
from torch.distributed._protocol_version import _exchange, _judge, _messages
from torch.distributed._protocol_version._families import C10D
from torch.distributed._protocol_version import (
    CHECK_MODE_ENV,
    MIN_VERSION_OVERRIDE_ENV,
    VERSION_OVERRIDE_ENV,
)
from torch.testing._internal.common_utils import find_free_port, run_tests, TestCase
from torch.testing._internal.distributed.protocol_version_utils import (
    env_init,
    GUARDRAIL_ENVS,
    MISMATCH,
    rank_info,
    RankThreads,
    spawn_ranks,
)


def _ranges_env(ranges: dict[int, tuple[int, int]]) -> dict[int, dict[str, str | None]]:
    """``{rank: (min, version)}`` -> per-rank override variables."""
    return {
        rank: {MIN_VERSION_OVERRIDE_ENV: str(low), VERSION_OVERRIDE_ENV: str(high)}
        for rank, (low, high) in ranges.items()
    }


# A rank's range: (min, version) with min <= version.
ranges = st.tuples(st.integers(0, 6), st.integers(0, 6)).map(lambda t: (min(t), max(t)))


class TestRangeRules(TestCase):
    @settings(max_examples=400, deadline=None)
    @given(st.lists(ranges, min_size=1, max_size=8))
    def test_group_rule_is_the_pairwise_rule(self, rank_ranges: list[tuple[int, int]]) -> None:
        infos = [rank_info(r, high, min_version=low) for r, (low, high) in enumerate(rank_ranges)]
        pairwise = all(
            a.version >= b.min_version and b.version >= a.min_version
            for a, b in itertools.combinations(infos, 2)
        )
        self.assertEqual(_judge.negotiate(infos) is not None, pairwise)

    @settings(max_examples=400, deadline=None)
    @given(st.lists(ranges, min_size=1, max_size=8))
    def test_negotiated_version_is_the_highest_every_rank_speaks(self, rank_ranges: list[tuple[int, int]]) -> None:
        infos = [rank_info(r, high, min_version=low) for r, (low, high) in enumerate(rank_ranges)]
        negotiated = _judge.negotiate(infos)
        spoken_by_all = [v for v in range(7) if all(i.min_version <= v <= i.version for i in infos)]
        self.assertEqual(negotiated, max(spoken_by_all) if spoken_by_all else None)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.integers(0, 4), min_size=1, max_size=8))
    def test_exact_match_defaults(self, versions: list[int]) -> None:
        # The first issue's rule: with min == version everywhere, all must be equal.
        infos = [rank_info(r, v) for r, v in enumerate(versions)]
        verdict = _judge.judge(C10D, infos, "gloo")
        if len(set(versions)) == 1:
            self.assertEqual((verdict.status, verdict.negotiated), ("ok", versions[0]))
        else:
            self.assertEqual(verdict.status, "mismatch")
            self.assertIn(MISMATCH, verdict.detail)

    @settings(max_examples=200, deadline=None)
    @given(ranges, st.integers(0, 6), st.sampled_from(["error", "warn"]), st.booleans())
    def test_a_rank_joins_a_negotiated_version_it_speaks(
        self, rank_range: tuple[int, int], negotiated: int, mode: str, enforce: bool
    ) -> None:
        # A late rank, a worker taking torchrun's agents' verdict, an agent rejoining the static rendezvous.
        info = dataclasses.replace(rank_info(1, rank_range[1], min_version=rank_range[0]), mode=mode)
        verdict = _judge.joined(C10D, info, "gloo", "rank 1 came late", negotiated, enforce)
        speaks = rank_range[0] <= negotiated <= rank_range[1]
        self.assertEqual(verdict.negotiated, negotiated if speaks else None)
        self.assertEqual(verdict.enforce, enforce or mode == "error")  # the strictest mode decides
        if not speaks:
            self.assertIn(f"rank 1 came late, and the others negotiated protocol version {negotiated}", verdict.detail)

    @settings(max_examples=25, deadline=None)
    @given(st.lists(ranges, min_size=2, max_size=4), st.randoms(use_true_random=False))
    def test_verdict_does_not_depend_on_arrival_order(self, rank_ranges: list[tuple[int, int]], rnd: Any) -> None:
        # Real exchanges on one store, ranks arriving in a hypothesis-chosen order.
        order = list(range(len(rank_ranges)))
        rnd.shuffle(order)
        outcomes = self._exchange_in_order(rank_ranges, order)
        expected = _judge.negotiate([rank_info(r, high, min_version=low) for r, (low, high) in enumerate(rank_ranges)])
        if expected is None:
            self.assertTrue(all(isinstance(o, RuntimeError) for o in outcomes.values()), outcomes)
        else:
            self.assertEqual(set(outcomes.values()), {expected})

    def _exchange_in_order(self, rank_ranges: list[tuple[int, int]], order: list[int]) -> dict[int, Any]:
        store = dist.HashStore()
        threads = RankThreads(len(rank_ranges), timeout_s=10)
        infos = {r: rank_info(r, high, min_version=low) for r, (low, high) in enumerate(rank_ranges)}
        # Every rank's first check with this store: they all check under one namespace.
        namespace, _ = pv._attempt_namespace("check", 0)
        with mock.patch.object(_exchange, "local_info", lambda r, family, mode, name="": infos[r]):
            for rank in order[:-1]:
                threads.start({rank: store})
                # Publish one at a time, in the chosen order: a rank's payload stays until
                # the verdict, which needs the last rank too, so the next starts once it is there.
                store.wait([C10D.key(namespace, "rank", rank)], timedelta(seconds=10))
            threads.start({order[-1]: store})
            outcomes = threads.join()
        return {rank: outcome.result for rank, outcome in outcomes.items()}


class TestAdvice(TestCase):
    """"What to do" names changes that really make the group compatible."""

    @settings(max_examples=400, deadline=None)
    @given(
        st.lists(ranges, min_size=2, max_size=8),
        st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=8, max_size=8),
    )
    def test_following_the_advice_gives_a_compatible_group(
        self, rank_ranges: list[tuple[int, int]], spans: list[tuple[int, int]]
    ) -> None:
        infos = [rank_info(r, high, min_version=low) for r, (low, high) in enumerate(rank_ranges)]
        assume(_judge.negotiate(infos) is None)
        upgrade, required, roll_back, lowest = _judge.advise(infos)

        def replaced(ranks: tuple[int, ...], target: int) -> list[Any]:
            # Any build whose range holds the target will do: [target - below, target + above].
            return [
                rank_info(i.rank, target + spans[i.rank][1], min_version=max(target - spans[i.rank][0], 0))
                if i.rank in ranks else i
                for i in infos
            ]

        self.assertIsNotNone(_judge.negotiate(replaced(upgrade, required)))
        self.assertIsNotNone(_judge.negotiate(replaced(roll_back, lowest)))

    def test_rolling_back_the_strictest_rank_alone_is_not_enough(self) -> None:
        # 1..1, 2..3, 3..3: rolling back rank 2 alone leaves ranks 0 and 1 apart.
        infos = [rank_info(0, 1), rank_info(1, 3, min_version=2), rank_info(2, 3)]
        self.assertEqual(_judge.advise(infos), ((0,), 3, (1, 2), 1))


class TestRangeMessages(TestCase):
    def test_incompatible_ranges_message(self) -> None:
        infos = [
            rank_info(0, 2, min_version=1), rank_info(1, 2, min_version=1),
            rank_info(2, 4, min_version=3, host="node-b"), rank_info(3, 1, host="node-c"),
        ]
        verdict = _judge.judge(C10D, infos, "gloo")
        self.assertExpectedInline(
            _messages.error_message(verdict.detail, infos[0], C10D),
            """\
torch.distributed protocol version mismatch: the 4 ranks of this job (backend gloo) run builds that cannot talk to each other.
  protocol version 1: rank 3 on host node-c (torch 2.13.0+cpu)
  protocol versions 1-2: ranks 0-1 on host node-a (torch 2.13.0+cpu)
  protocol versions 3-4: rank 2 on host node-b (torch 2.13.0+cpu)
Why: rank 2 accepts nothing older than protocol version 3, but ranks 0-1,3 speak at most version 2.
What to do: upgrade ranks 0-1,3 to a build that speaks protocol version 3, or roll rank 2 back to a build that accepts protocol version 1; then restart the job.
This rank (rank 0, host node-a) runs protocol versions 1-2.""",
        )

    def test_min_override(self) -> None:
        with mock.patch.dict(os.environ, {VERSION_OVERRIDE_ENV: "5", MIN_VERSION_OVERRIDE_ENV: "3"}):
            self.assertEqual(version_range(C10D), (3, 5))
        with mock.patch.dict(os.environ, {MIN_VERSION_OVERRIDE_ENV: "0"}):
            os.environ.pop(VERSION_OVERRIDE_ENV, None)
            self.assertEqual(version_range(C10D), (0, pv.PROTOCOL_VERSION))
        with mock.patch.dict(os.environ, {VERSION_OVERRIDE_ENV: "2", MIN_VERSION_OVERRIDE_ENV: "3"}):
            self.assertRaisesRegex(RuntimeError, f"{MIN_VERSION_OVERRIDE_ENV}=3 is above", version_range, C10D)
        with mock.patch.dict(os.environ, {MIN_VERSION_OVERRIDE_ENV: "x"}):
            self.assertRaisesRegex(RuntimeError, f"{MIN_VERSION_OVERRIDE_ENV}='x'", version_range, C10D)


# --------------------------------------------------------------------------- #
# Multi-process: ranges through init_process_group, and the framework helper
# --------------------------------------------------------------------------- #


def gloo_on_own_store(rank: int, world_size: int, port: int) -> float:
    """What a framework does without init_process_group: check, then build
    ProcessGroupGloo directly on the store, then use it."""
    timeout = timedelta(seconds=60)
    store = dist.TCPStore("127.0.0.1", port, world_size, rank == 0, timeout=timeout)
    negotiated = pv.check_protocol_version(store, rank, world_size, timeout, backend="gloo")
    pg = dist.ProcessGroupGloo(dist.PrefixStore("my_framework", store), rank, world_size, timeout)
    tensor = torch.full((1,), float(negotiated))
    pg.allreduce([tensor]).wait()
    return tensor.item()


class TestRangesMultiProcess(TestCase):
    def test_overlapping_ranges_agree_on_the_highest_common_version(self) -> None:
        # Rank 0 is the new build (speaks 2-3), rank 1 the old one (1-2): they run 2.
        results = spawn_ranks(env_init, 2, args=(find_free_port(),), rank_env=_ranges_env({0: (2, 3), 1: (1, 2)}))
        self.assertEqual([r.value for r in results], [{"sum": 2.0, "group_version": 2}] * 2)

    def test_disjoint_ranges_fail_everywhere(self) -> None:
        results = spawn_ranks(env_init, 2, args=(find_free_port(),), rank_env=_ranges_env({0: (1, 1), 1: (2, 3)}))
        for result in results:
            self.assertEqual(result.error_type, "ProtocolVersionError", str(result))
            self.assertIn("protocol versions 2-3: rank 1", result.error)
            self.assertIn("upgrade rank 0 to a build that speaks protocol version 2", result.error)

    def test_helper_before_process_group_gloo(self) -> None:
        results = spawn_ranks(gloo_on_own_store, 2, args=(find_free_port(),))
        self.assertEqual([r.value for r in results], [2.0 * pv.PROTOCOL_VERSION] * 2)

    def test_helper_refuses_a_mixed_job_and_ignores_the_mode(self) -> None:
        # Calling the helper is the decision to check: TORCH_DISTRIBUTED_PROTOCOL_CHECK=off
        # does not silence it.
        results = spawn_ranks(
            gloo_on_own_store, 2, args=(find_free_port(),),
            rank_env={1: {VERSION_OVERRIDE_ENV: "2"}}, common_env={CHECK_MODE_ENV: "off"},
        )
        for result in results:
            self.assertEqual(result.error_type, "ProtocolVersionError", str(result))
            self.assertIn(MISMATCH, result.error)


# --------------------------------------------------------------------------- #
# The operator CLI
# --------------------------------------------------------------------------- #


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in GUARDRAIL_ENVS}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed._protocol_version", *args],
        env={**clean, **env}, capture_output=True, text=True, timeout=120,
    )


class TestCli(TestCase):
    def test_json_with_overrides(self) -> None:
        rpc_env = pv.RPC_VERSION_OVERRIDE_ENV
        out = _cli("--json", **{VERSION_OVERRIDE_ENV: " 4 ", MIN_VERSION_OVERRIDE_ENV: "2", CHECK_MODE_ENV: "warn", rpc_env: "3"})
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(
            json.loads(out.stdout),
            {
                "protocol_version": 4,
                "min_protocol_version": 2,
                # The RPC family has its own versions; a collectives' override leaves them.
                "rpc": {"protocol_version": 3, "min_protocol_version": 3},
                "torch_version": importlib.metadata.version("torch"),  # the distribution's: it tells builds apart
                "git_version": torch.version.git_version,
                "python_version": platform.python_version(),
                "backend_versions": {"nccl": ".".join(map(str, torch.cuda.nccl.version()))} if dist.is_nccl_available() else {},
                "check_mode": "warn",
                "overrides": {VERSION_OVERRIDE_ENV: " 4 ", MIN_VERSION_OVERRIDE_ENV: "2", rpc_env: "3"},
            },
        )

    def test_invalid_settings_exit_non_zero(self) -> None:
        for env in ({VERSION_OVERRIDE_ENV: "1.5"}, {CHECK_MODE_ENV: "loud"}, {MIN_VERSION_OVERRIDE_ENV: "2", VERSION_OVERRIDE_ENV: "1"}):
            out = _cli("--json", **env)
            self.assertEqual(out.returncode, 2, env)
            # Tooling that asked for JSON gets JSON, even for a bad setting.
            self.assertIn(next(iter(env)), json.loads(out.stdout)["error"])
            self.assertIn(next(iter(env)), out.stderr)


if __name__ == "__main__":
    run_tests()
