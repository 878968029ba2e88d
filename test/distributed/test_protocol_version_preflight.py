# Owner(s): ["oncall: distributed"]
"""Build identity in the payload and the node CLI, and the cluster preflight.

Two builds can share a version string (``2.13.0+cpu``); the payload carries the
torch commit, the Python version and the backend libraries' versions, older
payloads without them are still judged, messages show the commit where it is
what tells two builds apart, and ``python -m torch.distributed._protocol_version``
shows them for one node.

``python -m torch.distributed._protocol_version --preflight`` runs the check of
``init_process_group`` across a job without building a backend: under a real
``torchrun`` with four workers (matching, one odd rank, a silent rank), and with
an explicit ``--store`` where rank 0 hosts the store, or where one rank runs a
torch without the check (``.venv-stock``) and starts a real gloo group instead.
The table's own layout is tested on plain data.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from collections.abc import Sequence
from unittest import mock

import torch
import torch.distributed as dist
from hypothesis import given, settings, strategies as st
from torch.distributed._protocol_version import _cli, _exchange, _judge, _messages, _preflight
from torch.distributed._protocol_version._families import C10D
from torch.distributed._protocol_version._payload import (
    InvalidPayload,
    local_info,
    parse_payload,
    RankInfo,
    Verdict,
)
from torch.distributed._protocol_version._settings import CHECK_MODE_ENV, SettingError
from torch.testing._internal.common_utils import find_free_port, run_tests, TestCase
from torch.testing._internal.distributed.protocol_version_utils import (
    GUARDRAIL_ENVS,
    MISMATCH,
    NO_STOCK_REASON,
    ODD_RANK_ENV,
    OLD_PAYLOAD,
    STOCK_PYTHON,
    rank_info,
    RankThreads,
    read_verdict_as,
    run_in_own_session,
    VERSION_OVERRIDE_ENV,
)


# What the first build of the check wrote: no schema, family, mode or overrides.
FIRST_PAYLOAD = (
    b'{"protocol_version": 1, "min_protocol_version": 1, "torch_version": "2.13.0+cpu", '
    b'"hostname": "node-first", "pid": 4243, "token": "0123456789abcdef"}'
)
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def built(info: RankInfo, commit: str = COMMIT_A, python: str = "3.11.7") -> RankInfo:
    return dataclasses.replace(info, git_version=commit, python_version=python)


def payload(info: RankInfo) -> bytes:
    return info.to_payload(C10D).encode()


class TestBuildIdentity(TestCase):
    def test_payload_names_the_build(self) -> None:
        obj = json.loads(local_info(0, C10D, "error").to_payload(C10D))
        nccl = {"nccl": ".".join(map(str, torch.cuda.nccl.version()))} if dist.is_nccl_available() else {}
        self.assertEqual(obj["git_version"], torch.version.git_version)
        self.assertEqual(obj["python_version"], platform.python_version())
        self.assertEqual(obj["backend_versions"], nccl)  # gloo has no version API: the commit names it
        parsed = parse_payload(0, json.dumps(obj).encode())
        self.assertEqual(parsed.git_version, torch.version.git_version)
        self.assertEqual(parsed.python_version, platform.python_version())
        self.assertEqual(dict(parsed.backend_versions), nccl)
        self.assertLess(len(json.dumps(obj)), 1024)  # still a few hundred bytes

    def test_old_payloads_read_as_unknown_builds(self) -> None:
        for raw in (OLD_PAYLOAD, FIRST_PAYLOAD):
            info = parse_payload(1, raw)
            self.assertEqual((info.version, info.torch_version), (1, "2.13.0+cpu"))
            self.assertEqual((info.git_version, info.python_version, info.backend_versions), ("unknown", "unknown", ()))

    def test_old_payloads_are_judged_beside_new_ones(self) -> None:
        new = payload(built(rank_info(0, 1)))
        verdict = _judge.judge_payloads(C10D, {0: new, 1: OLD_PAYLOAD, 2: FIRST_PAYLOAD}, [], "gloo")
        self.assertEqual((verdict.status, verdict.negotiated, verdict.detail), ("ok", 1, ""))
        newer = payload(built(rank_info(0, 2)))
        verdict = _judge.judge_payloads(C10D, {0: newer, 1: OLD_PAYLOAD, 2: FIRST_PAYLOAD}, [], "gloo")
        self.assertExpectedInline(
            verdict.detail.splitlines()[1] + "\n" + verdict.detail.splitlines()[2],
            """\
  protocol version 1: ranks 1-2 on hosts node-first, node-old (torch 2.13.0+cpu, commit unknown)
  protocol version 2: rank 0 on host node-a (torch 2.13.0+cpu, commit aaaaaaaaaaaa)""",
        )

    def test_old_payloads_over_a_real_store(self) -> None:
        """Ranks 0 and 1 run the real check; ranks 2 and 3 publish what an older
        guardrail build writes, where such a rank would."""
        store = dist.HashStore()
        for rank, raw in ((2, OLD_PAYLOAD), (3, FIRST_PAYLOAD)):  # the first check with this store object
            store.set(C10D.key("check/0/0", "rank", rank), raw)
        threads = RankThreads(4, timeout_s=30.0).start({0: store, 1: store})
        verdict = Verdict.from_json("verdict", read_verdict_as(store, [2, 3]))
        outcomes = threads.join()
        self.assertEqual({rank: o.result for rank, o in outcomes.items()}, {0: 1, 1: 1})
        self.assertEqual((verdict.status, verdict.negotiated, verdict.readers), ("ok", 1, 3))
        self.assertEqual(store.num_keys(), 0)  # every rank read the verdict: nothing is left

    def test_commit_shown_only_where_it_tells_builds_apart(self) -> None:
        two_commits = [built(rank_info(0, 1)), built(rank_info(1, 2, host="node-b"), COMMIT_B)]
        one_commit = [built(rank_info(0, 1)), built(rank_info(1, 2, host="node-b"))]
        newer_release = dataclasses.replace(built(rank_info(1, 2), COMMIT_B), torch_version="2.14.0")
        two_versions = [built(rank_info(0, 1)), newer_release]
        self.assertExpectedInline(
            "\n".join(_messages.describe_groups(two_commits)),
            """\
  protocol version 1: rank 0 on host node-a (torch 2.13.0+cpu, commit aaaaaaaaaaaa)
  protocol version 2: rank 1 on host node-b (torch 2.13.0+cpu, commit bbbbbbbbbbbb)""",
        )
        # One build announcing two versions (a test override): the commit tells nothing apart.
        self.assertExpectedInline(
            "\n".join(_messages.describe_groups(one_commit)),
            """\
  protocol version 1: rank 0 on host node-a (torch 2.13.0+cpu)
  protocol version 2: rank 1 on host node-b (torch 2.13.0+cpu)""",
        )
        self.assertExpectedInline(
            "\n".join(_messages.describe_groups(two_versions)),
            """\
  protocol version 1: rank 0 on host node-a (torch 2.13.0+cpu)
  protocol version 2: rank 1 on host node-a (torch 2.14.0)""",
        )

    def test_identity_fields_are_validated_and_capped(self) -> None:
        base = json.loads(OLD_PAYLOAD)
        with self.assertRaisesRegex(InvalidPayload, "'backend_versions' must be an object"):
            parse_payload(1, json.dumps({**base, "backend_versions": ["nccl", "2.21"]}).encode())
        with self.assertRaisesRegex(InvalidPayload, "'git_version' must be a string"):
            parse_payload(1, json.dumps({**base, "git_version": 7}).encode())
        hostile = {
            **base,
            "git_version": "f" * 5000,
            "python_version": "3.11\n\x1b[2J",
            "backend_versions": {f"lib{i}": "1" * 500 for i in range(50)},
        }
        info = parse_payload(1, json.dumps(hostile).encode())
        self.assertEqual(info.git_version, "f" * 128)
        self.assertEqual(info.python_version, "3.11??[2J")
        self.assertEqual(len(info.backend_versions), 4)
        self.assertTrue(all(len(v) == 128 for _, v in info.backend_versions))

    @settings(max_examples=200, deadline=None)
    @given(
        commit=st.text(max_size=300),
        python=st.text(max_size=300),
        backends=st.dictionaries(st.text(max_size=200), st.text(max_size=200), max_size=8),
    )
    def test_identity_round_trips_what_can_be_shown(self, commit: str, python: str, backends: dict[str, str]) -> None:
        """A field comes back as sent when it is short and printable; otherwise
        printable, at most 128 characters, and never empty."""
        sent = dataclasses.replace(
            rank_info(0, 1), git_version=commit, python_version=python, backend_versions=tuple(backends.items())
        )
        got = parse_payload(0, payload(sent))
        for before, after in [(commit, got.git_version), (python, got.python_version)]:
            self.assertTrue(after.isprintable() and 0 < len(after) <= 128)
            if before.isprintable() and 0 < len(before) <= 128:
                self.assertEqual(after, before)
        self.assertLessEqual(len(got.backend_versions), 4)


# --------------------------------------------------------------------------- #
# The table, on plain data
# --------------------------------------------------------------------------- #


def infos_on_hosts(hosts: int, per_host: int, odd_host: int | None = None) -> list[RankInfo]:
    out = []
    for rank in range(hosts * per_host):
        host = rank // per_host
        version = 2 if host == odd_host else 1
        commit = COMMIT_B if host == odd_host else COMMIT_A
        out.append(built(rank_info(rank, version, host=f"node-{host:03d}"), commit))
    return out


class TestPreflightTable(TestCase):
    def test_two_hosts_one_odd_rank(self) -> None:
        infos = [built(rank_info(r, 1)) for r in range(3)] + [built(rank_info(3, 2, host="node-b"), COMMIT_B)]
        self.assertExpectedInline(
            _preflight.render_table(_preflight.Roster(4, tuple(infos)), "gloo"),
            """\
torch.distributed protocol version preflight (backend gloo): 4 ranks, 4 with the check on 2 hosts
host    ranks  protocol  torch       commit        python
------  -----  --------  ----------  ------------  ------
node-a  0-2    1         2.13.0+cpu  aaaaaaaaaaaa  3.11.7
node-b  3      2         2.13.0+cpu  bbbbbbbbbbbb  3.11.7""",
        )

    def test_a_backends_column_where_some_rank_reports_a_library(self) -> None:
        """Builds with NCCL report its version; the column shows it, and "-" for a build without."""
        nccl = dataclasses.replace(built(rank_info(1, 1, host="node-b")), backend_versions=(("nccl", "2.30.7"),))
        self.assertExpectedInline(
            _preflight.render_table(_preflight.Roster(2, (built(rank_info(0, 1)), nccl)), "gloo"),
            """\
torch.distributed protocol version preflight (backend gloo): 2 ranks, 2 with the check on 2 hosts
host    ranks  protocol  torch       commit        python  backends
------  -----  --------  ----------  ------------  ------  -----------
node-a  0      1         2.13.0+cpu  aaaaaaaaaaaa  3.11.7  -
node-b  1      1         2.13.0+cpu  aaaaaaaaaaaa  3.11.7  nccl 2.30.7""",
        )

    def test_every_host_gets_a_row(self) -> None:
        """17 hosts of 4 ranks, host 9 on another build: one row each, none folded
        away, rank lists compressed."""
        infos = infos_on_hosts(17, 4, odd_host=9)
        self.assertExpectedInline(
            _preflight.render_table(_preflight.Roster(68, tuple(infos)), "gloo"),
            """\
torch.distributed protocol version preflight (backend gloo): 68 ranks, 68 with the check on 17 hosts
host      ranks  protocol  torch       commit        python
--------  -----  --------  ----------  ------------  ------
node-000  0-3    1         2.13.0+cpu  aaaaaaaaaaaa  3.11.7
node-001  4-7    1         2.13.0+cpu  aaaaaaaaaaaa  3.11.7
node-002  8-11   1         2.13.0+cpu  aaaaaaaaaaaa  3.11.7
node-003  12-15  1         2.13.0+cpu  aaaaaaaaaaaa  3.11.7
node-004  16-19  1         2.13.0+cpu  aaaaaaaaaaaa  3.11.7
node-005  20-23  1         2.13.0+cpu  aaaaaaaaaaaa  3.11.7
node-006  24-27  1         2.13.0+cpu  aaaaaaaaaaaa  3.11.7
node-007  28-31  1         2.13.0+cpu  aaaaaaaaaaaa  3.11.7
node-008  32-35  1         2.13.0+cpu  aaaaaaaaaaaa  3.11.7
node-009  36-39  2         2.13.0+cpu  bbbbbbbbbbbb  3.11.7
node-010  40-43  1         2.13.0+cpu  aaaaaaaaaaaa  3.11.7
node-011  44-47  1         2.13.0+cpu  aaaaaaaaaaaa  3.11.7
node-012  48-51  1         2.13.0+cpu  aaaaaaaaaaaa  3.11.7
node-013  52-55  1         2.13.0+cpu  aaaaaaaaaaaa  3.11.7
node-014  56-59  1         2.13.0+cpu  aaaaaaaaaaaa  3.11.7
node-015  60-63  1         2.13.0+cpu  aaaaaaaaaaaa  3.11.7
node-016  64-67  1         2.13.0+cpu  aaaaaaaaaaaa  3.11.7""",
        )

    def test_ranks_without_the_check_silent_and_invalid(self) -> None:
        raws = {r: payload(built(rank_info(r, 1))) for r in range(3)}
        raws[3] = b"protocol_version=1"
        raws.update(dict.fromkeys([4, *range(10, 990)], _exchange.NO_CHECK.encode()))
        roster = _preflight.roster(1000, raws)
        self.assertExpectedInline(
            _preflight.render_table(roster, "gloo"),
            """\
torch.distributed protocol version preflight (backend gloo): 1000 ranks, 3 with the check on 1 host
host    ranks  protocol  torch       commit        python
------  -----  --------  ----------  ------------  ------
node-a  0-2    1         2.13.0+cpu  aaaaaaaaaaaa  3.11.7
without the check (host not known, taken as protocol version 1): ranks 4,10-989
silent (published nothing, started no backend): ranks 5-9,990-999
invalid payload: rank 3""",
        )


class TestPreflightOnWarn(TestCase):
    def test_a_rank_later_than_the_grace_period_is_still_on_the_roll(self) -> None:
        """``warn`` bounds init's wait by a grace period; the preflight, a roll
        call, waits for every rank up to its timeout in every mode."""
        store = dist.HashStore()
        reports: dict[int, _preflight.Report] = {}

        def body(rank: int) -> None:
            time.sleep(2.5 if rank == 2 else 0.0)  # rank 2 arrives well past the grace period
            _preflight.preflight(store, rank, 3, timedelta(seconds=30), "gloo", lambda r: reports.__setitem__(r.rank, r))

        with mock.patch.dict(os.environ, {CHECK_MODE_ENV: "warn"}):
            threads = [threading.Thread(target=body, args=(r,)) for r in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
        self.assertEqual({r: report.exit_code for r, report in reports.items()}, {0: 0, 1: 0, 2: 0})
        self.assertIn("3 ranks, 3 with the check on 1 host", reports[0].text)
        self.assertNotIn("judged without", reports[0].text)


class TestPreflightRoster(TestCase):
    def test_rank_0_prints_the_payloads_it_judged(self) -> None:
        """Rank 0's table is built from the payloads it judged: a rank whose slot
        holds garbage is listed as invalid beside the ranks that checked, and no
        rank's job would start."""
        store = dist.HashStore()
        job = dist.PrefixStore(_preflight.STORE_PREFIX, store)
        namespace = "preflight/0/0"
        job.set(C10D.key(namespace, "rank", 2), b"protocol_version=1")
        reports: dict[int, _preflight.Report] = {}

        def body(s: dist.Store, rank: int, world_size: int) -> int:
            return _preflight.preflight(s, rank, world_size, timedelta(seconds=30), "gloo",
                                        lambda r: reports.__setitem__(r.rank, r))

        threads = RankThreads(3, 30.0, body).start({0: store, 1: store})
        read_verdict_as(job, [2], namespace)
        self.assertEqual({r: o.result for r, o in threads.join().items()}, {0: 1, 1: 1})
        self.assertEqual(reports[0].obj["status"], "invalid")
        self.assertEqual(reports[0].obj["invalid"], {"2": "not valid JSON (Expecting value: line 1 column 1 (char 0))"})
        self.assertEqual([host["ranks"] for host in reports[0].obj["hosts"]], [[0, 1]])
        self.assertIn("3 ranks, 2 with the check on 1 host", reports[0].text)
        self.assertIn("\ninvalid payload: rank 2\n", reports[0].text)
        self.assertIn("rank 2: not valid JSON", reports[1].text)


# --------------------------------------------------------------------------- #
# Real processes: the node CLI, torchrun, and an explicit store
# --------------------------------------------------------------------------- #

NPROC = 4
SILENT_RANK_ENV = "PV_TEST_SILENT_LOCAL_RANK"
LINGER_RANK_ENV = "PV_TEST_LINGER_LOCAL_RANK"
LATE_RANK_ENV = "PV_TEST_LATE_LOCAL_RANK"
# The worker under torchrun: the odd local rank announces version 2; the silent
# one never runs the preflight and waits to be stopped; the late one starts 3 s
# after the others; every other rank runs the CLI and reports its code, and the
# lingering one then waits to be stopped too.
WORKER_SCRIPT = f'''\
import os
import signal
import sys
import time

local_rank = os.environ["LOCAL_RANK"]
if local_rank == os.environ.get("{LATE_RANK_ENV}"):
    time.sleep(3)  # past the grace period: the arrival itself is the scenario
if local_rank == os.environ.get("{ODD_RANK_ENV}"):
    os.environ["{VERSION_OVERRIDE_ENV}"] = "2"
if local_rank == os.environ.get("{SILENT_RANK_ENV}"):
    signal.pause()
from torch.distributed._protocol_version._cli import main

code = main(sys.argv[1:])
os.write(1, f"preflight rank={{os.environ['RANK']}} exit={{code}}\\n".encode())
if local_rank == os.environ.get("{LINGER_RANK_ENV}"):
    signal.pause()  # until torchrun stops it, once another worker exits non-zero
sys.stdout.flush()
os._exit(code)  # as python -m torch.distributed._protocol_version ends
'''
# A rank of a job on torch without the check: it builds its gloo group on the job's store.
STOCK_RANK = """\
import sys
from datetime import timedelta
import torch.distributed as dist
host_port, rank, world_size = sys.argv[1:4]
dist.init_process_group("gloo", init_method=f"tcp://{host_port}", rank=int(rank),
                        world_size=int(world_size), timeout=timedelta(seconds=60))
"""
BOUND_S = 120.0


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in GUARDRAIL_ENVS}
    env.update(extra)
    return env


def masked_table(output: str) -> str:
    """The table and verdict rank 0 printed, with what depends on this machine and build
    (host, torch version, commit, Python) masked, the backends column (builds with NCCL
    have one) left out, and the column padding made uniform."""
    start = output.index(f"{C10D.title} preflight")
    end = output.index("The job would", start)
    block = output[start : output.index("\n", end)]
    mask = {
        socket.gethostname(): "<host>",
        importlib.metadata.version("torch"): "<torch>",
        torch.version.git_version[:12]: "<commit>",
        platform.python_version(): "<python>",
    }
    lines, backends = [], None
    for line in block.splitlines():
        cells = re.split(r"  +", line)
        if len(cells) > 1 and not line.startswith(" "):
            backends = cells.index("backends") if "backends" in cells else backends
            cells = cells if backends is None else cells[:backends] + cells[backends + 1:]
            line = " | ".join("--" if set(c) == {"-"} else mask.get(c, c) for c in cells)
        lines.append(line.replace(f"host {socket.gethostname()})", "host <host>)"))
    return "\n".join(lines)


def exit_lines(output: str) -> dict[int, int]:
    return {int(m[1]): int(m[2]) for m in re.finditer(r"preflight rank=(\d+) exit=(\d+)", output)}


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed._protocol_version", *args]
    return subprocess.run(cmd, env=clean_env(**env), capture_output=True, text=True, timeout=BOUND_S)


class TestNodeCli(TestCase):
    def test_json_names_the_build(self) -> None:
        out = run_cli("--json")
        self.assertEqual(out.returncode, 0, out.stderr)
        obj = json.loads(out.stdout)
        identity = {k: obj[k] for k in ("torch_version", "git_version", "python_version", "backend_versions")}
        self.assertEqual(
            identity,
            {
                "torch_version": importlib.metadata.version("torch"),
                "git_version": torch.version.git_version,
                "python_version": platform.python_version(),
                "backend_versions": dict(local_info(0, C10D, "error").backend_versions),
            },
        )

    def test_text_names_the_build(self) -> None:
        out = run_cli()
        self.assertEqual(out.returncode, 0, out.stderr)
        libraries = ", ".join(f"{name} {v}" for name, v in local_info(0, C10D, "error").backend_versions) or "none reported"
        masked = (
            out.stdout.replace(importlib.metadata.version("torch"), "<torch>")
            .replace(torch.version.git_version, "<commit>")
            .replace(platform.python_version(), "<python>")
            .replace(libraries, "<libraries>")
        )
        self.assertExpectedInline(masked, """\
protocol version:     1
minimum accepted:     1
RPC protocol version: 1
RPC minimum accepted: 1
torch version:        <torch>
torch commit:         <commit>
python version:       <python>
backend libraries:    <libraries>
check mode:           error
overrides in effect:  none
""")

    def test_timeout_zero_is_refused_with_a_true_range(self) -> None:
        out = run_cli("--preflight", "--timeout", "0", "--store", "127.0.0.1:1", "--rank", "0", "--world-size", "2")
        self.assertEqual(out.returncode, 2, out.stderr)
        self.assertExpectedInline(out.stderr, """\
error: --timeout 0 is not a number of seconds above 0 and at most 31536000 (a year).
""")
        # The range the message states is the one applied.
        self.assertEqual(_cli._timeout(0.001), timedelta(milliseconds=1))
        self.assertEqual(_cli._timeout(31536000), timedelta(days=365))
        for refused in (-1.0, 31536000.5, float("nan"), float("inf")):
            with self.assertRaisesRegex(SettingError, "above 0 and at most 31536000"):
                _cli._timeout(refused)


class TestPreflightTorchrun(TestCase):
    def setUp(self) -> None:
        super().setUp()
        tmp = tempfile.TemporaryDirectory(prefix="pv-preflight-")
        self.addCleanup(tmp.cleanup)
        self.worker = Path(tmp.name) / "worker.py"
        self.worker.write_text(WORKER_SCRIPT)

    def torchrun(self, target: Sequence[str], *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={NPROC}", "--monitor-interval=1", *target, "--preflight", *args,
        ]
        result, timed_out = run_in_own_session(cmd, BOUND_S, clean_env(**env))
        self.assertFalse(timed_out, result.stdout[-4000:])
        return result

    def test_matching_ranks_print_the_table_and_exit_0(self) -> None:
        result = self.torchrun(["-m", "torch.distributed._protocol_version"], "--timeout", "60")
        self.assertEqual(result.returncode, 0, result.stdout[-4000:])  # every worker exited 0
        self.assertEqual(result.stdout.count(f"{C10D.title} preflight"), 1)  # rank 0 alone prints it
        # The agent hosts the store (TORCHELASTIC_USE_AGENT_STORE): rank 0 is a client and binds nothing.
        self.assertNotIn("failed to bind", result.stdout)
        self.assertExpectedInline(
            masked_table(result.stdout),
            """\
torch.distributed protocol version preflight (backend gloo): 4 ranks, 4 with the check on 1 host
host | ranks | protocol | torch | commit | python
-- | -- | -- | -- | -- | --
<host> | 0-3 | 1 | <torch> | <commit> | <python>

torch.distributed protocol version check passed (backend gloo): the 4 ranks negotiate protocol version 1.
The job would start.""",
        )

    def test_one_odd_rank_fails_every_rank(self) -> None:
        """Rank 2 stays on after its verdict until torchrun stops it with SIGTERM
        (rank 0 exited 1): it still ends with the verdict's code."""
        result = self.torchrun([str(self.worker)], "--timeout", "60", **{ODD_RANK_ENV: "3", LINGER_RANK_ENV: "2"})
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(exit_lines(result.stdout), dict.fromkeys(range(NPROC), 1), result.stdout[-4000:])
        # What torchrun itself saw: every worker's own code, none turned into -15 by its SIGTERM.
        self.assertEqual(len(re.findall(r"exitcode\s*: 1 ", result.stdout)), NPROC, result.stdout[-4000:])
        table = masked_table(result.stdout)
        self.assertIn("<host> | 0-2 | 1 | <torch> | <commit> | <python>", table)
        self.assertIn("<host> | 3 | 2 | <torch> | <commit> | <python>", table)
        self.assertIn(MISMATCH, table)
        self.assertIn("Why: rank 3 accepts nothing older than protocol version 2", table)

    def test_a_silent_rank_is_named_at_the_timeout(self) -> None:
        """Rank 0 comes 3 s after the others, whose timeout ends first: they wait on for
        its verdict, so that torchrun does not stop rank 0 before it prints its table."""
        started = time.monotonic()
        result = self.torchrun([str(self.worker)], "--timeout", "5", **{SILENT_RANK_ENV: "2", LATE_RANK_ENV: "0"})
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(exit_lines(result.stdout), {0: 1, 1: 1, 3: 1}, result.stdout[-4000:])
        table = masked_table(result.stdout)
        self.assertIn("silent (published nothing, started no backend): rank 2\n", table)
        self.assertIn(
            "timed out after 5s (backend gloo): rank 2 never published a protocol version", table
        )
        self.assertLess(time.monotonic() - started, BOUND_S)


def kill_session(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class TestPreflightExplicitStore(TestCase):
    def start(self, cmd: list[str]) -> subprocess.Popen[str]:
        """Start one rank in its own session, killed with it when the test ends."""
        proc = subprocess.Popen(
            cmd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self.addCleanup(kill_session, proc)
        return proc

    def finish(self, procs: dict[int, subprocess.Popen[str]]) -> dict[int, tuple[int | None, str]]:
        """Each rank's exit code (``None`` if it had to be killed) and its output."""
        out = {}
        deadline = time.monotonic() + BOUND_S
        for rank, proc in procs.items():
            try:
                output, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
                out[rank] = (proc.returncode, output)
            except subprocess.TimeoutExpired:
                kill_session(proc)
                out[rank] = (None, proc.communicate()[0])
        return out

    def launch(self, commands: dict[int, list[str]]) -> dict[int, tuple[int | None, str]]:
        return self.finish({rank: self.start(cmd) for rank, cmd in commands.items()})

    def preflight_cmd(self, port: int, rank: int, world_size: int, *args: str) -> list[str]:
        return [
            sys.executable, "-m", "torch.distributed._protocol_version", "--preflight",
            "--store", f"127.0.0.1:{port}", "--rank", str(rank), "--world-size", str(world_size),
            "--timeout", "60", *args,
        ]

    def test_a_rank_on_stock_torch_is_shown_without_the_check(self) -> None:
        if not STOCK_PYTHON.exists():
            self.skipTest(NO_STOCK_REASON)
        port = find_free_port()
        commands = {rank: self.preflight_cmd(port, rank, 4) for rank in range(3)}
        commands[3] = [str(STOCK_PYTHON), "-c", STOCK_RANK, f"127.0.0.1:{port}", "3", "4"]
        out = self.launch(commands)
        self.assertEqual([out[r][0] for r in range(3)], [0, 0, 0], out)
        table = masked_table(out[0][1])
        self.assertIn("<host> | 0-2 | 1 | <torch> | <commit> | <python>\n", table)
        self.assertIn("without the check (host not known, taken as protocol version 1): rank 3\n", table)
        self.assertIn("rank 3 runs a build without the protocol version check", table)

    def test_json_is_one_object_on_rank_0_and_nothing_elsewhere(self) -> None:
        port = find_free_port()
        out = self.launch({rank: self.preflight_cmd(port, rank, 2, "--json") for rank in range(2)})
        self.assertEqual((out[0][0], out[1][0]), (0, 0), out)
        obj = json.loads(out[0][1].strip().splitlines()[-1])
        self.assertEqual((obj["exit_code"], obj["status"], obj["negotiated"]), (0, "ok", 1))
        self.assertEqual(obj["hosts"][0]["ranks"], [0, 1])
        self.assertEqual(obj["hosts"][0]["git_version"], torch.version.git_version)
        self.assertNotIn("{", out[1][1])

    def test_rank_0_keeps_the_store_until_every_rank_read_the_verdict(self) -> None:
        """Rank 0 hosts the store. Rank 1 is stopped once it has published; after
        rank 2 has come and gone with the verdict, rank 0 still serves the store,
        so rank 1 reads the verdict once it goes on."""
        port = find_free_port()
        procs = {rank: self.start(self.preflight_cmd(port, rank, 3)) for rank in range(2)}
        client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=BOUND_S))
        job = dist.PrefixStore(_preflight.STORE_PREFIX, client)
        namespace = "preflight/0/0"  # a preflight's, on a first attempt
        job.wait([C10D.key(namespace, "rank", 1)])
        os.kill(procs[1].pid, signal.SIGSTOP)
        procs[2] = self.start(self.preflight_cmd(port, 2, 3))
        self.assertEqual(procs[2].wait(BOUND_S), 0)
        verdict_key = C10D.key(namespace, "verdict")
        self.assertEqual(Verdict.from_json(verdict_key, job.get(verdict_key)).status, "ok")
        with self.assertRaises(subprocess.TimeoutExpired):  # without its wait, rank 0 is gone at once
            procs[0].wait(timeout=3)
        os.kill(procs[1].pid, signal.SIGCONT)
        out = self.finish(procs)
        self.assertEqual({rank: code for rank, (code, _) in out.items()}, {0: 0, 1: 0, 2: 0}, out)

    def test_bad_settings_exit_2_with_one_line(self) -> None:
        cli = [sys.executable, "-m", "torch.distributed._protocol_version", "--preflight"]
        cases = {
            "MASTER_ADDR is not set": (cli, {}),
            "--store, --rank and --world-size go together": (cli + ["--rank", "1"], {}),
            f"{VERSION_OVERRIDE_ENV}='x' is not a valid protocol version": (
                cli + ["--store", "127.0.0.1:1", "--rank", "0", "--world-size", "2"], {VERSION_OVERRIDE_ENV: "x"}
            ),
        }
        for expected, (cmd, env) in cases.items():
            env = {k: v for k, v in clean_env(**env).items() if k not in ("MASTER_ADDR", "RANK", "WORLD_SIZE")}
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=BOUND_S)
            self.assertEqual(proc.returncode, 2, proc.stderr)
            self.assertEqual(proc.stderr.strip().count("\n"), 0, proc.stderr)
            self.assertIn(expected, proc.stderr)


if __name__ == "__main__":
    run_tests()
