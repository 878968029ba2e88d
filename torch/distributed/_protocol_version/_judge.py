"""The compatibility rule and the advice: pure functions over payloads, tested without processes."""

from collections.abc import Sequence

from torch.distributed._protocol_version import _messages
from torch.distributed._protocol_version._families import Family
from torch.distributed._protocol_version._payload import InvalidPayload, no_check_info, parse_payload, RankInfo, Verdict


def negotiate(infos: Sequence[RankInfo]) -> int | None:
    """The highest version every rank speaks, or ``None``. Each pair is compatible
    (each one's version at least the other's minimum) exactly when the lowest
    version is at least the highest minimum; then the lowest version is it."""
    lowest_version, highest_minimum = min(i.version for i in infos), max(i.min_version for i in infos)
    return lowest_version if lowest_version >= highest_minimum else None


def advise(infos: Sequence[RankInfo]) -> tuple[tuple[int, ...], int, tuple[int, ...], int]:
    """Two changes, each alone enough to meet :func:`negotiate`'s rule: upgrade these ranks
    to a build that speaks this version, or roll those back to one that accepts that one."""
    required, lowest = max(i.min_version for i in infos), min(i.version for i in infos)
    upgrade = tuple(i.rank for i in infos if i.version < required)
    return upgrade, required, tuple(i.rank for i in infos if i.min_version > lowest), lowest


def judge(family: Family, infos: Sequence[RankInfo], backend: str) -> Verdict:
    """The verdict on a complete set of ranks; on a mismatch the strictest mode among the checking ranks decides
    (``enforce``, kept on a pass too, for a rank that comes later)."""
    no_check = [i.rank for i in infos if not i.checked]
    negotiated, enforce = negotiate(infos), any(i.mode == "error" for i in infos if i.checked)
    if negotiated is not None:
        warning = _messages.no_check_warning(family, no_check, backend) if no_check else ""
        return Verdict("ok", warning, negotiated, enforce)
    return Verdict("mismatch", _messages.mismatch_detail(family, infos, backend, *advise(infos)), None, enforce)


def judge_payloads(family: Family, raws: dict[int, bytes], no_check: Sequence[int], backend: str) -> Verdict:
    """Parse every published payload, add the ranks seen without the check, judge."""
    infos = [no_check_info(rank) for rank in no_check]
    problems: list[tuple[int, str]] = []
    for rank, raw in raws.items():
        try:
            infos.append(parse_payload(rank, raw))
        except InvalidPayload as e:
            problems.append((rank, str(e)))
    if problems:
        return Verdict("invalid", _messages.invalid_detail(family, sorted(problems), backend), None)
    return judge(family, sorted(infos, key=lambda i: i.rank), backend)


def joined(family: Family, info: RankInfo, backend: str, came: str, negotiated: int, enforce: bool) -> Verdict:
    """The verdict on a rank that ``came`` to a job whose other ranks negotiated ``negotiated`` without it:
    ``ok`` where it speaks that version, else a mismatch, enforced unless it and they (``enforce``) run warn."""
    if info.min_version <= negotiated <= info.version:
        return Verdict("ok", "", negotiated, enforce or info.mode == "error")
    detail = _messages.late_mismatch(family, backend, came, negotiated)
    return Verdict("mismatch", detail, None, enforce or info.mode == "error")
