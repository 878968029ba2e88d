"""A cluster of hosts on one machine, for multi-node tests of the protocol version check.

Each host is a network namespace (its loopback and one address on a private
bridge), a UTS namespace (its own hostname) and a mount namespace (its own
``/etc/hosts`` naming every host, and an ``/etc/resolv.conf`` without a name
server, so a lookup never leaves the host), the last two held open by one idle
process. The bridge sits in a namespace of its own, the switch, so nothing in
the machine's own network namespace changes, and no packet can leave the
cluster: a host has routes to its loopback and the bridge's subnet only.

    with Cluster(3) as cluster:
        job = run_job(cluster, [fork_venv, fork_venv, other_build_venv])
        job.event(cluster.hosts[2], "init_failed")["error"]

:func:`run_job` runs a real multi-node ``torchrun`` (c10d rendezvous on host 0)
of ``protocol_version_cluster_worker.py``, one worker per host, each host
with the torch of its own venv. A command is killed at its timeout with every
process it started on its host, and what it leaves behind when it exits is
killed too. Everything is removed on exit, even on failure, and
at interpreter exit when the ``with`` block never ended. Namespaces left by a
run that was killed (their owner pid is gone) are removed, with every process in
them, when the next cluster starts. Making namespaces needs root, ``ip``,
``unshare`` and ``nsenter``: :func:`unavailable_reason` says what is missing,
for a skip.
"""

from __future__ import annotations

import atexit
import datetime
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TYPE_CHECKING
from collections.abc import Callable, Mapping, Sequence

from torch.testing._internal.distributed.protocol_version_utils import GUARDRAIL_ENVS


if TYPE_CHECKING:
    from typing_extensions import Self


# Every namespace and scratch directory is named PREFIX-<owner pid>-<serial>-...,
# so leftovers of a dead owner can be told from a live cluster's.
PREFIX = "pvcluster"
_NAME_RE = re.compile(rf"^{PREFIX}-(\d+)-")
SUBNET = "10.213.0"  # a /24 that exists only on the switch's bridge
# The job script every host runs under torchrun (a plain file: stock torch runs it too).
WORKER = Path(__file__).resolve().with_name("protocol_version_cluster_worker.py")
_TOOLS = ("ip", "unshare", "nsenter")
_serial = itertools.count()
# The idle process that holds a host's UTS and mount namespaces open; it says
# "ready" once the hostname, /etc/hosts and /etc/resolv.conf are in place.
_HOLDER_SCRIPT = (
    'hostname "$1" && mount --bind "$2/hosts" /etc/hosts && '
    'mount --bind "$2/resolv.conf" /etc/resolv.conf && echo ready && exec sleep infinity'
)


class ClusterError(RuntimeError):
    """A step of making or driving the cluster failed; the message has the command's output."""


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (for a test skip), or ``None``."""
    if os.geteuid() != 0:
        return "making network, UTS and mount namespaces needs root"
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        return f"making the cluster needs {', '.join(missing)} (iproute2, util-linux)"
    return None


def ip(*args: str) -> str:
    """``ip ARGS``'s output; a :class:`ClusterError` with its message when it fails."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ClusterError(f"`ip {' '.join(args)}` exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def _owner_gone(name: str) -> bool:
    """Whether ``name`` is one of ours whose owner process no longer exists."""
    match = _NAME_RE.match(name)
    if match is None:
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return True
    return False


def _netns_names() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def _remove_netns(name: str) -> None:
    """Kill every process inside the namespace, then delete it (and so its links)."""
    for pid in ip("netns", "pids", name).split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    ip("netns", "del", name)


def remove_leftovers() -> list[str]:
    """Remove namespaces and scratch directories of clusters whose owner died."""
    removed = [name for name in _netns_names() if _owner_gone(name)]
    for name in removed:
        _remove_netns(name)
    for scratch in Path(tempfile.gettempdir()).glob(f"{PREFIX}-*"):
        if _owner_gone(scratch.name):
            shutil.rmtree(scratch, ignore_errors=True)
            removed.append(str(scratch))
    return removed


@dataclass(frozen=True)
class Host:
    """One host: its position, hostname, address on the bridge, and network namespace."""

    index: int
    name: str
    address: str
    netns: str


@dataclass(frozen=True)
class Command:
    """``<venv>/bin/python ARGS`` with ``env`` added, killed after ``timeout`` seconds."""

    venv: Path
    args: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    timeout: float = 120.0


@dataclass(frozen=True)
class HostRun:
    """What one command did on one host; times are ``time.time()``."""

    host: Host
    returncode: int | None
    output: str
    timed_out: bool
    started: float
    finished: float

    @property
    def wall_s(self) -> float:
        return self.finished - self.started


def _command_env(venv: Path, extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without what would leak into a host's build:
    the guardrail's variables, PYTHONPATH, another venv."""
    dropped = {*GUARDRAIL_ENVS, "PYTHONPATH", "VIRTUAL_ENV"}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


class Cluster:
    """``size`` hosts named ``names`` (default ``node-a``, ``node-b``, ...) at
    ``SUBNET.1``, ``SUBNET.2``, ...; a context manager."""

    def __init__(self, size: int, names: Sequence[str] | None = None) -> None:
        names = list(names or (f"node-{chr(ord('a') + i)}" for i in range(size)))
        if len(names) != size or not 1 <= size <= 200:
            raise ValueError(f"need 1-200 hosts and one name each, got {size} and {names}")
        self._base = f"{PREFIX}-{os.getpid()}-{next(_serial)}"
        self.hosts = [
            Host(i, name, f"{SUBNET}.{i + 1}", f"{self._base}-h{i}") for i, name in enumerate(names)
        ]
        self._switch = f"{self._base}-sw"
        self._holders: dict[int, subprocess.Popen[str]] = {}
        self._scratch: Path | None = None

    def __enter__(self) -> Self:
        remove_leftovers()
        atexit.register(self.close)
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        self._scratch = Path(tempfile.mkdtemp(prefix=f"{self._base}-"))
        (self._scratch / "hosts").write_text(
            "127.0.0.1 localhost\n" + "".join(f"{h.address} {h.name}\n" for h in self.hosts)
        )
        (self._scratch / "resolv.conf").write_text("# no name server: names come from /etc/hosts\n")
        ip("netns", "add", self._switch)
        ip("-n", self._switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self._switch, "link", "set", "br0", "up")
        for host in self.hosts:
            self._add_host(host, self._scratch)

    def _add_host(self, host: Host, etc: Path) -> None:
        """The host's namespace, its link to the switch, and its holder process."""
        ip("netns", "add", host.netns)
        port = f"v{host.index}"
        ip("-n", self._switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        ip("-n", self._switch, "link", "set", port, "master", "br0", "up")
        ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        ip("-n", host.netns, "link", "set", "eth0", "up")
        ip("-n", host.netns, "link", "set", "lo", "up")
        holder = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, "unshare", "--uts", "--mount", "sh", "-c",
             _HOLDER_SCRIPT, "sh", host.name, str(etc)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self._holders[host.index] = holder
        assert holder.stdout is not None
        if holder.stdout.readline().strip() != "ready":
            holder.kill()
            _, err = holder.communicate()
            raise ClusterError(f"could not set up host {host.name}'s hostname and /etc/hosts: {err.strip()}")

    def close(self) -> None:
        """Remove every namespace, link, process and file of this cluster; idempotent."""
        atexit.unregister(self.close)
        present = set(_netns_names())
        for name in [h.netns for h in self.hosts] + [self._switch]:
            if name in present:
                _remove_netns(name)
        for holder in self._holders.values():
            holder.kill()
            holder.communicate()
        self._holders.clear()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def set_link(self, host: Host, up: bool) -> None:
        """Take the host's only network link down (a pulled cable) or up again."""
        ip("-n", host.netns, "link", "set", "eth0", "up" if up else "down")

    def run(self, host: Host, command: Command) -> HostRun:
        """Run ``command`` inside ``host`` (its network, hostname and /etc/hosts);
        kill it, and everything it started, at its timeout. Whatever it leaves
        running on the host is killed once it has exited: torchrun starts its
        workers in sessions of their own, so a torchrun killed at its timeout
        leaves them behind, holding its output open."""
        holder = self._holders[host.index]
        cmd = [
            "nsenter", "--target", str(holder.pid), "--net", "--uts", "--mount", "--",
            str(command.venv / "bin" / "python"), *command.args,
        ]
        with tempfile.TemporaryFile() as out:
            started = time.time()
            proc = subprocess.Popen(
                cmd, env=_command_env(command.venv, command.env), stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
            try:
                proc.wait(timeout=command.timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                self._kill_all_but_holder(host)
                proc.wait()
            finished = time.time()
            self._kill_all_but_holder(host)
            out.seek(0)
            output = out.read().decode(errors="replace")
        return HostRun(host, proc.returncode, output, timed_out, started, finished)

    def _kill_all_but_holder(self, host: Host) -> None:
        """Kill every process in the host's network namespace but its holder."""
        holder = self._holders[host.index].pid
        for pid in map(int, ip("netns", "pids", host.netns).split()):
            if pid != holder:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def run_all(self, commands: Mapping[int, Command]) -> dict[int, HostRun]:
        """Run one command per host index, all at once; wait for all of them."""
        with ThreadPoolExecutor(max_workers=len(commands)) as pool:
            futures = {i: pool.submit(self.run, self.hosts[i], c) for i, c in commands.items()}
            return {i: f.result() for i, f in futures.items()}


# --------------------------------------------------------------------------- #
# Multi-node torchrun jobs
# --------------------------------------------------------------------------- #

ENDPOINT = 0  # the host whose torchrun hosts the rendezvous store
JOB_BOUND_S = 120.0  # a torchrun still running after this is hung: killed
# torchrun's per-process OpenMP warning, and thread fan-out on a small machine;
# torchrun's INFO lines (a rendezvous round joined, closed: when an agent reached
# the check and left it) and the agent check's (passed, with the version).
_JOB_ENV = {"OMP_NUM_THREADS": "1", "LOGLEVEL": "INFO"}
_RDZV_LOGS = "torch.distributed.elastic.rendezvous"
_CHECK_LOGS = "torch.distributed._protocol_version"
# torch's log prefix: level, month and day, local time to the microsecond, pid, place.
_LOG_RE = re.compile(r"^([DIWEC])(\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{6}) +(\d+) ([^\]]*)\] ?(.*)$")
_JOINED_RE = re.compile(r"has joined round (\d+) of the rendezvous '[^']*' as rank (\d+) in a world of size (\d+)")
# How an agent leaves the rendezvous: torchrun's last step, also right after the
# agent check raised (a host whose store host has gone fails to, and says so).
_LEFT_RE = re.compile(r"has (closed|failed to shutdown) the rendezvous")
# The last line of a Python traceback: a dotted exception type and its message.
_RAISED_RE = re.compile(r"^((?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*)): (.*)$")


@dataclass(frozen=True)
class LogLine:
    """One line of torch's logging: its ``time.time()``, level letter, pid and text."""

    time: float
    level: str
    pid: int
    text: str


def log_lines(output: str) -> list[LogLine]:
    """The lines of ``output`` that torch's logging wrote (its own prefix), in order.
    The prefix has no year and is in local time, as this machine's clock is."""
    lines = []
    now = datetime.datetime.now()
    for line in output.splitlines():
        match = _LOG_RE.match(line)
        if match is None:
            continue
        level, month, day, hour, minute, second, micro, pid, _, text = match.groups()
        stamp = datetime.datetime(now.year, int(month), int(day), int(hour), int(minute), int(second), int(micro))
        if stamp - now > datetime.timedelta(days=1):  # written last year (a run across New Year)
            stamp = stamp.replace(year=now.year - 1)
        lines.append(LogLine(stamp.timestamp(), level, int(pid), text))
    return lines


@dataclass(frozen=True)
class Round:
    """A rendezvous round an agent joined, from its log: its group rank and when
    it joined (the round was complete: the agent check comes next)."""

    round: int
    group_rank: int
    group_world_size: int
    joined: float


@dataclass(frozen=True)
class Raised:
    """An exception a process died of, from the traceback in its output."""

    type: str  # the class name, without its module
    message: str  # every line of it


def raised(output: str, starting: str = "") -> Raised | None:
    """The last exception in ``output`` whose message starts with ``starting``,
    with the lines of its message (up to the next empty line)."""
    lines = output.splitlines()
    found = None
    for i, line in enumerate(lines):
        match = _RAISED_RE.match(line)
        if match is None or not match.group(3).startswith(starting) or not starting and "Error" not in match.group(2):
            continue
        message = [match.group(3)]
        for more in lines[i + 1:]:
            if not more.strip() or _LOG_RE.match(more):
                break
            message.append(more)
        found = Raised(match.group(2), "\n".join(message))
    return found


@dataclass(frozen=True)
class Job:
    """One multi-node job: each host's torchrun, and each host's worker reports
    (``launched``, ``start``, then ``done`` or ``init_failed``; see the worker's
    docstring)."""

    runs: dict[int, HostRun]
    events: dict[str, list[dict[str, Any]]]  # hostname -> reports, in order

    def event(self, host: Host, name: str, attempt: int | None = None) -> dict[str, Any] | None:
        """The first ``name`` report of ``host`` (of torchrun's attempt ``attempt``, if given)."""
        return next(iter(self.events_of(host, name, attempt)), None)

    def events_of(self, host: Host, name: str, attempt: int | None = None) -> list[dict[str, Any]]:
        return [
            e for e in self.events.get(host.name, [])
            if e["event"] == name and (attempt is None or e["attempt"] == attempt)
        ]

    def launched(self) -> list[str]:
        """The hosts on which any worker process started (its first report)."""
        return sorted(name for name, events in self.events.items() if any(e["event"] == "launched" for e in events))

    def last_arrival(self) -> float:
        """When the last worker called ``init_process_group``."""
        return max(e["began"] for events in self.events.values() for e in events if "began" in e)

    def logged(self, host: Host, text: str) -> list[LogLine]:
        """The log lines of host's torchrun (agent and workers) that contain ``text``."""
        return [line for line in log_lines(self.runs[host.index].output) if text in line.text]

    def rounds(self, host: Host) -> list[Round]:
        """The rendezvous rounds host's agent joined, in order (its INFO lines)."""
        rounds = []
        for line in log_lines(self.runs[host.index].output):
            match = _JOINED_RE.search(line.text)
            if match is not None:
                rounds.append(Round(*map(int, match.groups()), line.time))
        return rounds

    def group_rank(self, host: Host) -> int | None:
        """Host's agent's rank in the first round, if it joined one."""
        rounds = self.rounds(host)
        return rounds[0].group_rank if rounds else None

    def agents_arrival(self) -> float:
        """When the last agent joined the first round, and so reached the agent check."""
        return max(self.rounds(run.host)[0].joined for run in self.runs.values())

    def left(self, host: Host) -> float | None:
        """When host's agent left the rendezvous: torchrun's last step, right
        after the agent check raised when it did."""
        return next((line.time for line in log_lines(self.runs[host.index].output) if _LEFT_RE.search(line.text)), None)

    def raised(self, host: Host, starting: str = "") -> Raised | None:
        """What host's torchrun died of (:func:`raised`)."""
        return raised(self.runs[host.index].output, starting)


def read_reports(report_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """The worker reports written so far, by hostname."""
    return {
        path.stem: [json.loads(line) for line in path.read_text().splitlines()]
        for path in report_dir.glob("*.jsonl")
    }


def _torchrun_args(
    endpoint: Host, nnodes: int, port: int, max_restarts: int, rdzv_conf: Mapping[str, Any], worker_args: Sequence[str]
) -> list[str]:
    """One node of a job of ``nnodes`` nodes, one worker each, c10d rendezvous on
    ``endpoint``. By default no restarts: a failed attempt is the outcome to look at."""
    conf = [f"--rdzv-conf={','.join(f'{k}={v}' for k, v in rdzv_conf.items())}"] if rdzv_conf else []
    return [
        "-m", "torch.distributed.run", f"--nnodes={nnodes}", "--nproc-per-node=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint.address}:{port}", *conf,
        f"--rdzv-id={PREFIX}-{port}", f"--max-restarts={max_restarts}", str(WORKER), *worker_args,
    ]


def has_check(venv: Path) -> bool:
    """Whether the torch of ``venv`` has the guardrail (stock torch does not)."""
    return any(venv.glob("lib/python*/site-packages/torch/distributed/_protocol_version/__init__.py"))


def _job_env(venv: Path) -> dict[str, str]:
    """TORCH_LOGS names only modules the build has: stock torch refuses, at
    ``import torch``, a name it cannot find."""
    logs = f"{_CHECK_LOGS},{_RDZV_LOGS}" if has_check(venv) else _RDZV_LOGS
    return {**_JOB_ENV, "TORCH_LOGS": logs}


def run_job(
    cluster: Cluster,
    venvs: Sequence[Path],
    port: int = 29400,
    worker_args: Sequence[str] = (),
    host_args: Mapping[int, Sequence[str]] | None = None,
    bounds: Mapping[int, float] | None = None,
    during: Callable[[Path], None] | None = None,
    env: Mapping[str, str] | None = None,
    host_env: Mapping[int, Mapping[str, str]] | None = None,
    max_restarts: int = 0,
    rdzv_conf: Mapping[str, Any] | None = None,
) -> Job:
    """Run the worker under ``torchrun`` on every host at once, host ``i`` with
    the torch of ``venvs[i]``, the rendezvous on :data:`ENDPOINT` at ``port``;
    ``len(venvs)`` nodes, on the first hosts of the cluster.

    ``worker_args`` go to every worker, ``host_args[i]`` to host ``i``'s only;
    ``env`` to every torchrun (and so its workers), ``host_env[i]`` to host
    ``i``'s only; ``max_restarts`` and ``rdzv_conf`` (``--rdzv-conf``, e.g.
    ``read_timeout``: the rendezvous store's timeout) to every torchrun. Host
    ``i``'s torchrun is killed after ``bounds[i]`` seconds (default
    :data:`JOB_BOUND_S`). ``during(report_dir)`` runs in this thread while the
    job does, to act on the cluster mid-job.
    """
    with tempfile.TemporaryDirectory(prefix=f"{PREFIX}-{os.getpid()}-reports-") as tmp:
        commands = {
            i: Command(
                venv,
                _torchrun_args(
                    cluster.hosts[ENDPOINT], len(venvs), port, max_restarts, rdzv_conf or {},
                    ["--report-dir", tmp, *worker_args, *(host_args or {}).get(i, ())],
                ),
                # TMPDIR: torchrun's log directories go with the reports.
                {**_job_env(venv), "TMPDIR": tmp, **(env or {}), **(host_env or {}).get(i, {})},
                (bounds or {}).get(i, JOB_BOUND_S),
            )
            for i, venv in enumerate(venvs)
        }
        runs: dict[int, HostRun] = {}
        job = threading.Thread(target=lambda: runs.update(cluster.run_all(commands)))
        job.start()
        try:
            if during is not None:
                during(Path(tmp))
        finally:
            job.join()
        return Job(runs, read_reports(Path(tmp)))
