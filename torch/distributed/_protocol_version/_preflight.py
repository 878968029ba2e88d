"""The check of ``init_process_group``, run on its own across a cluster before a
job starts (``python -m torch.distributed._protocol_version --preflight``).

Every rank runs the exchange ``init_process_group`` runs
(:func:`._exchange.exchange`) through the store it would hand the check
(``PrefixStore("default_pg")`` over the rendezvous store), and builds no
backend. So every rank reaches the verdict the job would reach, and exits with
it: 0 when ``init_process_group`` would go on, 1 otherwise. Rank 0, which judged
every payload, prints what every host runs.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from typing import Any, TYPE_CHECKING

from torch._C._distributed_c10d import PrefixStore
from torch.distributed._protocol_version import _attempt_namespace, _messages, gloo_key
from torch.distributed._protocol_version._exchange import exchange, NO_CHECK, Outcome
from torch.distributed._protocol_version._families import C10D
from torch.distributed._protocol_version._payload import InvalidPayload, parse_payload, RankInfo, Verdict
from torch.distributed._protocol_version._settings import CHECK_MODE_ENV, check_mode


if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from datetime import timedelta

    from torch._C._distributed_c10d import Store


__all__ = ["Report", "Roster", "preflight", "render_table", "roster"]

# The prefix init_process_group puts over a rendezvous store, and the name of the
# first default group: where a job's check and its gloo keys live.
STORE_PREFIX = "default_pg"
GROUP_NAME = "0"
EXIT_START, EXIT_NO_START = 0, 1
_COLUMNS = ("host", "ranks", "protocol", "torch", "commit", "python")


@dataclass(frozen=True)
class Roster:
    """Who published what in one check, as rank 0 reads it back for the table."""

    world_size: int
    infos: tuple[RankInfo, ...]  # ranks with a valid payload
    no_check: tuple[int, ...] = ()  # seen building the backend without the check
    silent: tuple[int, ...] = ()  # neither published nor started a backend
    invalid: tuple[tuple[int, str], ...] = ()  # (rank, reason)


@dataclass(frozen=True)
class Report:
    """One rank's outcome: its exit code, what it prints, and the JSON object."""

    rank: int
    exit_code: int
    text: str  # rank 0: the table and the verdict; others: the verdict
    obj: dict[str, Any]


def roster(world_size: int, raws: dict[int, bytes]) -> Roster:
    """Parse the payloads of one check.

    Args:
        world_size: the number of ranks.
        raws: the payloads judged, by rank (:data:`._exchange.NO_CHECK` for a
            rank seen building its backend without the check).

    Returns:
        The roster; every rank not in ``raws`` is silent.
    """
    infos, invalid = [], []
    no_check = [rank for rank, raw in raws.items() if raw == NO_CHECK.encode()]
    for rank, raw in sorted(raws.items()):
        if raw == NO_CHECK.encode():
            continue
        try:
            infos.append(parse_payload(rank, raw))
        except InvalidPayload as e:
            invalid.append((rank, str(e)))
    silent = [r for r in range(world_size) if r not in raws]
    return Roster(world_size, tuple(infos), tuple(sorted(no_check)), tuple(silent), tuple(invalid))


_Build = tuple[int, int, str, str, str, tuple[tuple[str, str], ...]]


def _rows(infos: Sequence[RankInfo]) -> dict[tuple[str, _Build], list[int]]:
    """Ranks by host and build, in order of their first rank."""
    rows: dict[tuple[str, _Build], list[int]] = {}
    for i in sorted(infos, key=lambda i: i.rank):
        build = (i.min_version, i.version, i.torch_version, i.git_version, i.python_version, i.backend_versions)
        rows.setdefault((i.hostname, build), []).append(i.rank)
    return rows


def _cells(host: str, ranks: list[int], build: _Build, with_backends: bool) -> list[str]:
    minimum, version, torch_version, git_version, python_version, backends = build
    protocol = str(version) if minimum == version else f"{minimum}-{version}"
    cells = [host, _messages.compress_ranks(ranks), protocol, torch_version, git_version[:12]]
    cells.append(python_version)
    return cells + [", ".join(f"{name} {v}" for name, v in backends) or "-"] if with_backends else cells


def _table(lines: list[list[str]]) -> list[str]:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * width for width in widths))
    return out


def render_table(found: Roster, backend: str) -> str:
    """Render what every host runs, as rank 0 prints it.

    Args:
        found: the check's roster.
        backend: the job's backend, for the title.

    Returns:
        A title, then one row per host and build (host, ranks, protocol range,
        torch version and commit, Python, and backend libraries where a build
        has them), then the ranks without the check, silent ranks and invalid
        payloads. Rank lists are compressed.
    """
    rows = _rows(found.infos)
    with_backends = any(info.backend_versions for info in found.infos)
    header = [*_COLUMNS, "backends"] if with_backends else list(_COLUMNS)
    lines = [header] + [_cells(host, ranks, build, with_backends) for (host, build), ranks in rows.items()]
    hosts = len({info.hostname for info in found.infos})
    out = [
        f"{C10D.title} preflight (backend {backend}): {found.world_size} "
        f"{_messages.plural(found.world_size, 'rank')}, {len(found.infos)} with the check on "
        f"{hosts} {_messages.plural(hosts, 'host')}",
        *(_table(lines) if found.infos else []),
    ]
    if found.no_check:
        no_check = _messages.ranks_phrase(found.no_check)
        out.append(f"without the check (host not known, taken as protocol version 1): {no_check}")
    if found.silent:
        out.append(f"silent (published nothing, started no backend): {_messages.ranks_phrase(found.silent)}")
    if found.invalid:
        out.append(f"invalid payload: {_messages.ranks_phrase([rank for rank, _ in found.invalid])}")
    return "\n".join(out)


def _roster_json(found: Roster) -> dict[str, Any]:
    fields = ("min_protocol_version", "protocol_version", "torch_version", "git_version", "python_version")
    hosts = []
    for (host, build), ranks in _rows(found.infos).items():
        hosts.append({"host": host, "ranks": ranks, **dict(zip(fields, build)), "backend_versions": dict(build[5])})
    return {
        "world_size": found.world_size,
        "hosts": hosts,
        "without_check": list(found.no_check),
        "silent": list(found.silent),
        "invalid": {str(rank): reason for rank, reason in found.invalid},
    }


def _exit_code(verdict: Verdict) -> int:
    """0 when ``init_process_group`` would go on: a pass, or a mismatch every
    checking rank downgrades with ``warn``; 1 otherwise."""
    starts = verdict.ok or verdict.warned
    return EXIT_START if starts else EXIT_NO_START


def _verdict_text(verdict: Verdict, info: RankInfo, world_size: int, backend: str) -> str:
    """What ``init_process_group`` would raise (or log) on this rank, then whether the job would start."""
    if verdict.ok:
        who = "the only rank speaks" if world_size == 1 else f"the {world_size} ranks negotiate"
        lines = [f"{C10D.title} check passed (backend {backend}): {who} "
                 f"protocol version {verdict.negotiated}."]
        lines += [verdict.detail] if verdict.detail else []
    else:
        lines = [_messages.error_message(verdict.detail, info, C10D)]
        if verdict.warned:
            lines.append(f"Every checking rank runs {CHECK_MODE_ENV}=warn: init_process_group would go on anyway.")
    lines.append("The job would start." if _exit_code(verdict) == EXIT_START else "The job would not start.")
    return "\n".join(lines)


def _exit_alike_when_stopped(code: int) -> None:
    """Once this rank has its verdict, a SIGTERM ends it with the verdict's code.

    torchrun stops every worker with SIGTERM as soon as one exits non-zero; the
    ranks leave within moments of each other, but the first one out would turn
    the others' code into -15. Only in the main thread (the CLI), where a process
    ends right after the preflight anyway.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: os._exit(code))


def preflight(
    store: Store,
    rank: int,
    world_size: int,
    timeout: timedelta,
    backend: str,
    emit: Callable[[Report], None],
) -> int:
    """Run the check of ``init_process_group`` on ``store`` without building a backend.

    ``TORCH_DISTRIBUTED_PROTOCOL_CHECK=off`` does not skip the check: the
    preflight is the decision to check.

    Args:
        store: the rendezvous store, before its ``default_pg`` prefix.
        rank: this rank.
        world_size: the number of ranks.
        timeout: how long this rank waits for the others, from its arrival.
        backend: the job's backend.
        emit: gets this rank's report once, before this function returns.

    Returns:
        This rank's exit code: 0 when ``init_process_group`` would go on, 1 otherwise.

    Raises:
        SettingError: a bad setting (before any store traffic).
        RuntimeError: the store failed (the store error's own type).
    """
    mode = "warn" if check_mode() == "warn" else "error"
    namespace, _ = _attempt_namespace("preflight", 0)  # a preflight process checks once
    trace = gloo_key(GROUP_NAME, "cpu") if backend == "gloo" else None
    # Every rank it can hear from, within the timeout, on warn too: the preflight is a roll call.
    outcome = exchange(PrefixStore(STORE_PREFIX, store), C10D, rank, world_size, timeout, backend, mode,
                       namespace, trace, patient=True)
    verdict, code = outcome.verdict, _exit_code(outcome.verdict)
    _exit_alike_when_stopped(code)
    text = _verdict_text(verdict, outcome.info, world_size, backend)
    if rank != 0:
        emit(Report(rank, code, text, {"rank": rank, "exit_code": code}))
        return code
    found = _roster_of(outcome, world_size)
    obj = {"exit_code": code, "backend": backend, "status": verdict.status, "negotiated": verdict.negotiated}
    obj.update(verdict=text, **_roster_json(found))
    emit(Report(rank, code, f"{render_table(found, backend)}\n\n{text}", obj))
    return code


def _roster_of(outcome: Outcome, world_size: int) -> Roster:
    """Rank 0's roster: what it judged (this rank alone when it judged nothing, an invalid payload)."""
    return roster(world_size, outcome.judged or {0: outcome.info.to_payload(C10D).encode()})
