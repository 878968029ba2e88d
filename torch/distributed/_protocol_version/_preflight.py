"""``python -m torch.distributed._protocol_version --preflight``: the check of
``init_process_group``, run on its own across a cluster before a job starts.

Every rank runs the very exchange ``init_process_group`` runs
(:func:`._exchange.exchange`), through the store it would hand the check
(``PrefixStore("default_pg")`` over the rendezvous store), and builds no
backend. So the verdict is the one the job would reach, and a rank that runs a
build without the check is seen the way the job's check sees it.

Then, outside the exchange, each rank makes a few calls of its own (O(1) per
rank but rank 0, which reads the N payloads in one ``multi_get``):

* rank 0 reads the epoch back (``get``), finds who published (``check``; more
  calls only when some did not), reads their payloads (``multi_get``) for the
  per-host table, publishes the exit code (``set``) and waits until every rank
  that published has read it (``wait``): it often hosts the store server;
* every other rank reads the epoch and the exit code (two ``get``) and says it
  is done (``add``; the last one also ``set``).

So every rank exits with rank 0's code: 0 when the job would start, 1 when it
would not.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch.distributed as dist
from torch.distributed.rendezvous import _torchelastic_use_agent_store
from torch.distributed._protocol_version import _messages
from torch.distributed._protocol_version._diagnose import backend_key_for
from torch.distributed._protocol_version._exchange import _parse_current, exchange
from torch.distributed._protocol_version._families import C10D, RPC
from torch.distributed._protocol_version._payload import InvalidPayload, parse_payload, RankInfo, Verdict
from torch.distributed._protocol_version._settings import CHECK_MODE_ENV, check_mode, SettingError, version_range
from torch.distributed._protocol_version._store import find_present, is_timeout, timed


__all__ = ["Endpoint", "Report", "Roster", "endpoint_from_env", "preflight", "render_table", "run"]

logger = logging.getLogger(__name__)

# The prefix init_process_group puts over a rendezvous store, and the name of the
# first default group: where a job's check and its gloo keys live.
STORE_PREFIX = "default_pg"
GROUP_NAME = "0"
# How long a rank waits for rank 0's exit code, and rank 0 for the others to read it.
RESULT_WAIT_S = 30.0
# The longest --timeout: a year, far inside what a store's millisecond timeout holds.
_MAX_TIMEOUT_S = 365 * 24 * 3600.0
# Rows of the text table before the rest is folded into one "and N more hosts" row.
MAX_ROWS = 16
EXIT_START, EXIT_NO_START, EXIT_BAD_SETTING = 0, 1, 2
_COLUMNS = ("host", "ranks", "protocol", "torch", "commit", "python")


@dataclass(frozen=True)
class Endpoint:
    """Where this rank meets the others: the store's address and its place in the job."""

    host: str
    port: int
    rank: int
    world_size: int


def timeout_from_seconds(seconds: float) -> timedelta:
    """``--timeout``: positive, finite, and at most a year, which every store's
    millisecond timeout holds; ``SettingError`` otherwise."""
    if not 0 < seconds <= _MAX_TIMEOUT_S:  # also false for NaN
        raise SettingError(f"--timeout {seconds:g} is not a number of seconds from 0 to {_MAX_TIMEOUT_S:g}.")
    return timedelta(seconds=seconds)


def _env_int(name: str) -> int:
    raw = os.environ.get(name)
    if raw is None or not raw.strip().isdigit():
        what = "not set" if raw is None else f"{raw[:40]!r}, not a non-negative integer"
        raise SettingError(f"{name} is {what}: run under torchrun, or pass --store, --rank and --world-size.")
    return int(raw)


def endpoint_from_env() -> Endpoint:
    """The rendezvous torchrun (or any ``env://`` launcher) sets up, read as
    ``env://`` reads it; raises ``SettingError`` naming a missing variable."""
    host = os.environ.get("MASTER_ADDR")
    if not host:
        raise SettingError("MASTER_ADDR is not set: run under torchrun, or pass --store, --rank and --world-size.")
    return Endpoint(host, _env_int("MASTER_PORT"), _env_int("RANK"), _env_int("WORLD_SIZE"))


def connect(endpoint: Endpoint, timeout: timedelta) -> dist.Store:
    """A client of the job's store, as ``env://`` and ``tcp://`` make it.

    Under torchrun (``TORCHELASTIC_USE_AGENT_STORE``) the agent hosts the store
    and every rank is a client; otherwise rank 0 hosts it. Unlike the rendezvous,
    rank 0 does not wait here for every rank to connect, so that a rank that never
    comes is named by the check instead of a count of connected clients.
    """
    hosts = endpoint.rank == 0 and not _torchelastic_use_agent_store()
    return dist.TCPStore(
        endpoint.host, endpoint.port, endpoint.world_size, hosts, timeout, wait_for_workers=False
    )


@dataclass(frozen=True)
class Roster:
    """Who published what in one check, as rank 0 reads it back for the table."""

    world_size: int
    infos: tuple[RankInfo, ...]  # ranks with a valid payload
    no_check: tuple[int, ...] = ()  # seen building the backend without the check
    silent: tuple[int, ...] = ()  # neither published nor started a backend
    invalid: tuple[tuple[int, str], ...] = ()  # (rank, reason)


def roster(world_size: int, raws: dict[int, bytes], no_check: Sequence[int]) -> Roster:
    """Parse the published payloads; every other rank not in ``no_check`` is silent."""
    infos, invalid = [], []
    for rank, raw in sorted(raws.items()):
        try:
            infos.append(parse_payload(rank, raw))
        except InvalidPayload as e:
            invalid.append((rank, str(e)))
    silent = [r for r in range(world_size) if r not in raws and r not in no_check]
    return Roster(world_size, tuple(infos), tuple(sorted(no_check)), tuple(silent), tuple(invalid))


# --------------------------------------------------------------------------- #
# The table: pure
# --------------------------------------------------------------------------- #

_Build = tuple[int, int, str, str, str, tuple[tuple[str, str], ...]]


def _build(info: RankInfo) -> _Build:
    return (
        info.min_version, info.version, info.torch_version, info.git_version,
        info.python_version, info.backend_versions,
    )


def _rows(infos: Sequence[RankInfo]) -> dict[tuple[str, _Build], list[int]]:
    """Ranks by host and build, in order of their first rank."""
    rows: dict[tuple[str, _Build], list[int]] = {}
    for info in sorted(infos, key=lambda i: i.rank):
        rows.setdefault((info.hostname, _build(info)), []).append(info.rank)
    return rows


def _build_cells(build: _Build, with_backends: bool) -> list[str]:
    minimum, version, torch_version, git_version, python_version, backends = build
    cells = [
        str(version) if minimum == version else f"{minimum}-{version}",
        torch_version,
        _messages.short_commit(git_version),
        python_version,
    ]
    if with_backends:
        cells.append(", ".join(f"{name} {v}" for name, v in backends) or "-")
    return cells


def _fold(rows: dict[tuple[str, _Build], list[int]]) -> tuple[list[tuple[str, _Build]], list[tuple[str, _Build]]]:
    """Split rows into the ones shown and the ones folded into "and N more hosts".

    Rows of a build other than the most common one are shown first, so the hosts
    an operator must look at are folded away only when they alone fill the table.
    """
    if len(rows) <= MAX_ROWS:
        return list(rows), []
    weight: Counter[_Build] = Counter()
    for (_, build), ranks in rows.items():
        weight[build] += len(ranks)
    usual = weight.most_common(1)[0][0]
    ordered = sorted(rows, key=lambda row: row[1] == usual)  # stable: rank order within each
    shown = set(ordered[: MAX_ROWS - 1])
    return [row for row in rows if row in shown], [row for row in rows if row not in shown]


def _folded_row(
    rows: dict[tuple[str, _Build], list[int]], folded: Sequence[tuple[str, _Build]], with_backends: bool
) -> list[str]:
    """One row for the folded rows: their hosts counted, their ranks compressed,
    and their build where they share one."""
    hosts = {host for host, _ in folded}
    builds = {build for _, build in folded}
    if len(builds) == 1:
        cells = _build_cells(builds.pop(), with_backends)
    else:
        cells = ["(various)"] * (len(_COLUMNS) - 2 + with_backends)
    ranks = [rank for row in folded for rank in rows[row]]
    host_cell = f"and {len(hosts)} more {_messages.plural(len(hosts), 'host')}"
    return [host_cell, _messages.compress_ranks(ranks), *cells]


def _table(lines: list[list[str]]) -> list[str]:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * width for width in widths))
    return out


def render_table(roster: Roster, backend: str) -> str:
    """The per-host table rank 0 prints: host, ranks, protocol range, torch version
    and commit, Python (and backend libraries where a build has them); then the
    ranks without the check, silent ranks and invalid payloads. At most
    :data:`MAX_ROWS` rows and compressed rank lists, so it reads the same at 2
    ranks and at 1,000.
    """
    rows = _rows(roster.infos)
    with_backends = any(info.backend_versions for info in roster.infos)
    columns = [*_COLUMNS, "backends"] if with_backends else list(_COLUMNS)
    shown, folded = _fold(rows)
    lines = [columns] + [
        [host, _messages.compress_ranks(rows[(host, build)]), *_build_cells(build, with_backends)]
        for host, build in shown
    ]
    if folded:
        lines.append(_folded_row(rows, folded, with_backends))
    host_count = len({info.hostname for info in roster.infos})
    out = [
        f"{C10D.title} preflight ({_messages.backend_text(backend)}): {roster.world_size} "
        f"{_messages.plural(roster.world_size, 'rank')}, {len(roster.infos)} with the check on "
        f"{host_count} {_messages.plural(host_count, 'host')}",
        *(_table(lines) if roster.infos else []),
    ]
    if roster.no_check:
        no_check = _messages.ranks_phrase(roster.no_check)
        out.append(f"without the check (host not known, taken as protocol version 1): {no_check}")
    if roster.silent:
        out.append(f"silent (published nothing, started no backend): {_messages.ranks_phrase(roster.silent)}")
    if roster.invalid:
        out.append(f"invalid payload: {_messages.ranks_phrase([rank for rank, _ in roster.invalid])}")
    return "\n".join(out)


def roster_json(roster: Roster) -> dict[str, Any]:
    """The same facts for tooling, every row and rank listed (no folding)."""
    rows = _rows(roster.infos)
    return {
        "world_size": roster.world_size,
        "hosts": [
            {
                "host": host,
                "ranks": ranks,
                "min_protocol_version": build[0],
                "protocol_version": build[1],
                "torch_version": build[2],
                "git_version": build[3],
                "python_version": build[4],
                "backend_versions": dict(build[5]),
            }
            for (host, build), ranks in rows.items()
        ],
        "without_check": list(roster.no_check),
        "silent": list(roster.silent),
        "invalid": {str(rank): reason for rank, reason in roster.invalid},
    }


# --------------------------------------------------------------------------- #
# The verdict and the exit code
# --------------------------------------------------------------------------- #


def exit_code(verdict: Verdict) -> int:
    """0 when ``init_process_group`` would go on: a pass, or a mismatch every
    checking rank downgrades with ``warn``; 1 otherwise."""
    starts = verdict.ok or (verdict.status == "mismatch" and not verdict.enforce)
    return EXIT_START if starts else EXIT_NO_START


def verdict_text(verdict: Verdict, info: RankInfo, world_size: int, backend: str) -> str:
    """What ``init_process_group`` would raise (or log) on this rank, then whether
    the job would start."""
    if verdict.ok:
        who = "the only rank speaks" if world_size == 1 else f"the {world_size} ranks negotiate"
        lines = [
            f"{C10D.title} check passed ({_messages.backend_text(backend)}): {who} "
            f"protocol version {verdict.negotiated}."
        ]
        lines += [verdict.detail] if verdict.detail else []
    else:
        lines = [_messages.error_message(verdict.detail, info, C10D)]
        if verdict.status == "mismatch" and not verdict.enforce:
            lines.append(f"Every checking rank runs {CHECK_MODE_ENV}=warn: init_process_group would go on anyway.")
    starts = exit_code(verdict) == EXIT_START
    lines.append("The job would start." if starts else "The job would not start.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# The store side
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Report:
    """One rank's outcome: its exit code, what it prints, and the JSON object."""

    rank: int
    exit_code: int
    text: str  # rank 0: the table and the verdict; others: the verdict
    obj: dict[str, Any]


def _read_roster(store: dist.Store, epoch: int, world_size: int, backend_key: Callable[[int], str] | None) -> Roster:
    slots = [C10D.key(epoch, "rank", r) for r in range(world_size)]
    present = find_present(store, slots)
    raws = dict(zip(present, store.multi_get([slots[r] for r in present])))
    absent = [r for r in range(world_size) if r not in raws]
    no_check = []
    if backend_key is not None and absent:
        no_check = [absent[i] for i in find_present(store, [backend_key(r) for r in absent])]
    return roster(world_size, raws, no_check)


def _result_keys(epoch: int) -> tuple[str, str, str]:
    return C10D.key(epoch, "preflight"), C10D.key(epoch, "preflight_done"), C10D.key(epoch, "preflight_read")


def _release(store: dist.Store, epoch: int, code: int, found: Roster) -> None:
    """Rank 0: publish the exit code, and stay until every rank that published has
    read it (rank 0 often hosts the store server)."""
    readers = [info.rank for info in found.infos if info.rank != 0]
    result, _, read = _result_keys(epoch)
    store.set(result, json.dumps({"exit_code": code, "readers": len(readers)}))
    if readers:
        try:
            store.wait([read], timedelta(seconds=RESULT_WAIT_S))
        except RuntimeError as e:
            if not is_timeout(e):
                raise
            logger.warning("%s preflight: not every rank read the exit code within %gs.", C10D.title, RESULT_WAIT_S)


def _parse_result(raw: bytes) -> tuple[int, int]:
    try:
        obj = json.loads(raw[:1024].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        obj = None
    code, readers = (obj.get("exit_code"), obj.get("readers")) if isinstance(obj, dict) else (None, None)
    if code not in (EXIT_START, EXIT_NO_START) or type(readers) is not int:
        raise InvalidPayload(f"rank 0 published an unreadable preflight result ({raw[:40]!r})")
    return code, readers


def _exit_alike_when_stopped(code: int) -> None:
    """Once this rank knows the job's exit code, a SIGTERM ends it with that code.

    torchrun stops every worker with SIGTERM as soon as one exits non-zero; the
    ranks leave within moments of each other, but the first one out would turn the
    others' code into -15. Only in the main thread (the CLI), where a process ends
    right after the preflight anyway.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: os._exit(code))


def _follow(store: dist.Store, own_code: int) -> int:
    """Any rank but 0: take rank 0's exit code, so that every rank exits alike.

    Keeps its own when rank 0 never opened a check (it runs none, or never came)
    or never published a result within :data:`RESULT_WAIT_S`.
    """
    current = C10D.key("current")
    if not store.check([current]):
        return own_code
    epoch, _ = _parse_current(store.get(current))
    result, done, read = _result_keys(epoch)
    raw = timed(store, timedelta(seconds=RESULT_WAIT_S), store.get, result)
    if raw is None:
        return own_code
    code, readers = _parse_result(raw)
    _exit_alike_when_stopped(code)
    if store.add(done, 1) >= readers:
        store.set(read, "1")
    else:
        # Leave together with the others: torchrun stops every worker as soon as
        # one exits non-zero, and would turn the slower ones' code into a SIGTERM.
        timed(store, timedelta(seconds=RESULT_WAIT_S), store.wait, [read])
    return code


def preflight(
    store: dist.Store,
    rank: int,
    world_size: int,
    timeout: timedelta,
    backend: str,
    emit: Callable[[Report], None],
) -> int:
    """Run the check of ``init_process_group`` on ``store`` (the rendezvous store,
    before its ``default_pg`` prefix) without building a backend; return the
    exit code, the same on every rank.

    ``emit`` gets this rank's report once; rank 0 gets it before it releases the
    others, because a launcher (torchrun) stops the remaining workers as soon as
    one exits with an error. ``TORCH_DISTRIBUTED_PROTOCOL_CHECK=off`` does not
    skip the check: the preflight is the decision to check. Raises
    ``SettingError`` on a bad setting (before any store traffic) and the store's
    own error when the store fails.
    """
    mode = "warn" if check_mode() == "warn" else "error"
    job_store = dist.PrefixStore(STORE_PREFIX, store)
    backend_key = backend_key_for(backend, GROUP_NAME)
    verdict, info = exchange(job_store, C10D, rank, world_size, timeout, backend, mode, backend_key)
    code = exit_code(verdict)
    text = verdict_text(verdict, info, world_size, backend)
    if rank != 0:
        code = _follow(job_store, code)
        emit(Report(rank, code, text, {"rank": rank, "exit_code": code}))
        return code
    if world_size == 1:
        found, epoch = Roster(1, (info,)), None
    else:
        epoch, _ = _parse_current(job_store.get(C10D.key("current")))
        found = _read_roster(job_store, epoch, world_size, backend_key)
    obj = {
        "exit_code": code,
        "backend": backend,
        "status": verdict.status,
        "negotiated": verdict.negotiated,
        "verdict": text,
        **roster_json(found),
    }
    emit(Report(rank, code, f"{render_table(found, backend)}\n\n{text}", obj))
    if epoch is not None:
        _exit_alike_when_stopped(code)
        _release(job_store, epoch, code, found)
    return code


def run(endpoint: Endpoint, timeout: timedelta, backend: str, emit: Callable[[Report], None]) -> int:
    """Connect to the job's store and run :func:`preflight` on it; every setting
    is validated first, so a bad one fails before the store is touched."""
    check_mode()
    version_range(C10D)
    version_range(RPC)  # the same settings the node check validates
    if endpoint.world_size < 1 or not 0 <= endpoint.rank < endpoint.world_size:
        raise SettingError(f"rank {endpoint.rank} is outside a world of size {endpoint.world_size}.")
    if not 0 < endpoint.port < 2**16:
        raise SettingError(f"port {endpoint.port} is not a TCP port (1-65535).")
    names = [part.rpartition(":")[2].strip().lower() for part in backend.split(",")]
    if not all(name in dist.Backend.backend_list for name in names):
        known = ", ".join(b for b in dist.Backend.backend_list if b != "undefined")
        raise SettingError(f"--backend {backend[:40]!r} names no registered backend ({known}; or DEVICE:BACKEND,...).")
    store = connect(endpoint, timeout)
    return preflight(store, endpoint.rank, endpoint.world_size, timeout, backend, emit)
