#!/usr/bin/env python3
"""`make demo`: the guardrail on a real 4-rank gloo job, in three acts.

(a) every rank runs the same build: init, all_reduce, the negotiated version;
(b) a rolling update caught half way (rank 3 already on protocol version 2):
    every rank fails at init, and we show how long that took;
(c) the same mixed job with the check off: what stock torch does (nothing notices).
"""

from __future__ import annotations

import sys
import textwrap
from typing import Any

from torch.distributed._protocol_version import CHECK_MODE_ENV
from torch.testing._internal.common_utils import find_free_port
from torch.testing._internal.distributed.protocol_version_utils import (
    env_init,
    RankResult,
    spawn_ranks,
    versions_env,
)


WORLD_SIZE = 4
TIMEOUT_S = 120.0


def banner(title: str) -> None:
    print(f"\n{'=' * 78}\n{title}\n{'=' * 78}")


def run_job(rank_env: dict[int, Any], common_env: dict[str, str] | None = None) -> list[RankResult]:
    return spawn_ranks(
        env_init,
        WORLD_SIZE,
        args=(find_free_port(), "gloo", TIMEOUT_S),
        rank_env=rank_env,
        common_env=common_env,
        timeout=TIMEOUT_S + 30,
    )


def show_successes(results: list[RankResult]) -> bool:
    for r in results:
        if r.ok:
            version = r.value["group_version"]
            print(f"  rank {r.rank}: all_reduce(ones) = {r.value['sum']:.0f}, group protocol "
                  f"version {'not negotiated' if version is None else version}")
        else:
            print(f"  rank {r.rank}: FAILED: {r.error_type}: {r.error}")
    return all(r.ok for r in results)


def act_a() -> bool:
    banner("(a) Every rank on the same build: init_process_group + all_reduce")
    return show_successes(run_job({}))


def act_b() -> bool:
    banner("(b) Rolling update half done: rank 3 already speaks protocol version 2")
    print(f"  (simulated with TORCH_DISTRIBUTED_PROTOCOL_VERSION_OVERRIDE=2 on rank 3; "
          f"init timeout {TIMEOUT_S:.0f}s)")
    results = run_job(versions_env({3: 2}))
    last_arrival = max(r.started for r in results)
    for r in results:
        waited = r.finished - last_arrival
        print(f"  rank {r.rank}: {r.error_type or 'no error!'} "
              f"{max(waited, 0.0):.2f}s after the last rank arrived")
    print("\n  The error every rank raised (shown once, from rank 0):\n")
    print(textwrap.indent(results[0].error or "", "    | "))
    every_rank_failed = all(r.error_type == "ProtocolVersionError" for r in results)
    print(f"\n  every rank failed early with the same error: {every_rank_failed}")
    return every_rank_failed


def act_c() -> bool:
    banner("(c) The same mixed job with the check off: stock torch's behaviour")
    print(f"  ({CHECK_MODE_ENV}=off: no store traffic, nothing is compared)")
    ok = show_successes(run_job(versions_env({3: 2}), {CHECK_MODE_ENV: "off"}))
    print("\n  Nothing noticed that rank 3 runs another protocol: with a real wire change,")
    print("  this is where a collective would hang, fail opaquely, or corrupt data.")
    return ok


def main() -> int:
    outcomes = [act_a(), act_b(), act_c()]
    banner("Summary")
    for name, ok in zip("abc", outcomes):
        print(f"  ({name}) {'as expected' if ok else 'NOT as expected'}")
    return 0 if all(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
