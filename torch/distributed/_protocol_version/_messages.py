"""Every sentence a user reads, built from plain data. Lists of ranks and hosts
are compressed and capped: a message stays a few KB at any world size."""

from collections.abc import Sequence
from datetime import timedelta

from torch.distributed._protocol_version._families import Family
from torch.distributed._protocol_version._payload import NO_CHECK_VERSION, RankInfo
from torch.distributed._protocol_version._settings import CHECK_MODE_ENV


MAX_LISTED = 8  # items one list shows before "and N more"
MAX_SPANS = 16  # spans ("0-5", "9") one rank list shows before "and N more"
NO_CHECK_BUILD = (
    f"a build without the protocol version check (or with {CHECK_MODE_ENV}=off), taken as version {NO_CHECK_VERSION}"
)
SEEN_BY_TRACE = ("(A rank is taken for one without the check when the key its backend writes as it starts comes before "
                 "its payload: if one of them does run the check, an earlier job left that key, and this job needs a "
                 "fresh store or store prefix.)")


def compress_ranks(ranks: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``; past :data:`MAX_SPANS` spans, ``"... and N more"``."""
    spans: list[list[int]] = []
    for rank in sorted(set(ranks)):
        if spans and spans[-1][1] == rank - 1:
            spans[-1][1] = rank
        else:
            spans.append([rank, rank])
    text = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans[:MAX_SPANS])
    hidden = sum(b - a + 1 for a, b in spans[MAX_SPANS:])
    return f"{text} and {hidden} more" if hidden else text


def plural(count: int, word: str) -> str:
    return word if count == 1 else f"{word}s"


def ranks_phrase(ranks: Sequence[int], singular_verb: str = "", plural_verb: str = "") -> str:
    """``[3]`` -> ``"rank 3"``, ``[0, 1, 2]`` -> ``"ranks 0-2"``, with a verb that agrees."""
    verb = singular_verb if len(set(ranks)) == 1 else plural_verb
    return f"{plural(len(set(ranks)), 'rank')} {compress_ranks(ranks)}{' ' + verb if verb else ''}"


def _some(items: Sequence[str]) -> str:
    extra = len(items) - MAX_LISTED
    return ", ".join(items[:MAX_LISTED]) + (f" and {extra} more" if extra > 0 else "")


def check_head(family: Family, backend: str) -> str:
    return f"{family.title} check (backend {backend})"


def range_text(version: int, min_version: int, word: str = "protocol version") -> str:
    return f"{word} {version}" if version == min_version else f"{word}s {min_version}-{version}"


def describe_groups(infos: Sequence[RankInfo], word: str = "protocol version") -> list[str]:
    """One line per build (range, torch version, commit): ranks (and RPC worker
    names), hosts, torch version, and the commit where builds share a version
    string but not a commit."""
    groups: dict[tuple[bool, int, int, str, str], list[RankInfo]] = {}
    for info in infos:
        build = (info.checked, info.version, info.min_version, info.torch_version, info.git_version)
        groups.setdefault(build, []).append(info)
    lines = []
    for (checked, version, min_version, torch_version, git_version), members in sorted(groups.items()):
        ranks, names = ranks_phrase([m.rank for m in members]), [m.name for m in members if m.name]
        if not checked:
            lines.append(f"  {NO_CHECK_BUILD}: {ranks}")
            continue
        who = f"{ranks} ({plural(len(names), 'worker')} {_some(names)})" if names else ranks
        hosts = sorted({m.hostname for m in members})
        commits = {g[4] for g in groups if g[0] and g[3] == torch_version}  # shown where it tells builds apart
        commit = f", commit {git_version[:12]}" if len(commits) > 1 else ""
        lines.append(f"  {range_text(version, min_version, word)}: {who} on {plural(len(hosts), 'host')} "
                     f"{_some(hosts)} (torch {torch_version}{commit})")
    if len(lines) > MAX_LISTED:
        lines[MAX_LISTED:] = [f"  and {len(lines) - MAX_LISTED} more builds"]
    return lines


def mismatch_detail(family: Family, infos: Sequence[RankInfo], backend: str, upgrade: Sequence[int],
                    required: int, roll_back: Sequence[int], lowest: int) -> str:
    """Who runs what, why they cannot meet, and which change would make them meet."""
    demanding, word = [i.rank for i in infos if i.min_version == required], family.version_word
    unchecked = [i.rank for i in infos if not i.checked and i.rank in upgrade]
    return "\n".join([
        f"{family.title} mismatch: the {len(infos)} ranks of this job (backend {backend}) run builds that "
        "cannot talk to each other.",
        *describe_groups(infos, word),
        f"Why: {ranks_phrase(demanding, 'accepts', 'accept')} nothing older than {word} {required}, but "
        f"{ranks_phrase(upgrade, 'speaks', 'speak')} at most version "
        f"{max(i.version for i in infos if i.version < required)}.",
        f"What to do: upgrade {ranks_phrase(upgrade)} to a build that speaks {word} {required}, or roll "
        f"{ranks_phrase(roll_back)} back to a build that accepts {word} {lowest}; then restart the job.",
        # Ranks judged as version 1 for running no check may run a newer build with the check off.
        *([f"If {ranks_phrase(unchecked, 'runs', 'run')} such a build with {CHECK_MODE_ENV}=off, unset it there "
           f"instead: a rank that skips the check counts as version 1. {SEEN_BY_TRACE}"] if unchecked else []),
        *([family.note] if family.note else []),
    ])


def no_check_warning(family: Family, no_check: Sequence[int], backend: str) -> str:
    return (f"{check_head(family, backend)}: {ranks_phrase(no_check, 'runs', 'run')} {NO_CHECK_BUILD}; every other "
            f"rank accepts version {NO_CHECK_VERSION}, so the job goes on. Roll the guardrail out to those nodes "
            f"before raising the minimum version. {SEEN_BY_TRACE}")


def invalid_detail(family: Family, problems: Sequence[tuple[int, str]], backend: str) -> str:
    shown = [f"  rank {rank}: {reason}" for rank, reason in problems[:MAX_LISTED]]
    return "\n".join([
        f"{family.title} check failed (backend {backend}): {len(problems)} {plural(len(problems), 'rank')} "
        "published an invalid protocol version payload or setting, so this job cannot be judged safe:",
        *shown, *([f"  and {len(problems) - MAX_LISTED} more"] if len(problems) > MAX_LISTED else []),
        "Where a line names an invalid setting, fix it on that host; otherwise something other than this check wrote "
        "to its keys in the store, or a build that speaks another payload format joined the job.",
    ])


def timeout_head(family: Family, timeout: timedelta, backend: str) -> str:
    return f"{family.title} check timed out after {timeout.total_seconds():g}s (backend {backend})"


def _silent(traceless: bool) -> str:
    no_trace = "exited, or a build without the check on a backend that leaves no trace in the store"
    return f"not started, still starting, {no_trace if traceless else 'or exited'}"


def never_arrived(ranks: Sequence[int], family: Family, traceless: bool) -> str:
    article = "an" if family.version_word[0] in "AEIOUR" else "a"  # "an RPC ...": read letter by letter
    return f"{ranks_phrase(ranks)} never published {article} {family.version_word} ({_silent(traceless)})"


def no_verdict(family: Family, rank: int, missing: Sequence[int], traceless: bool) -> str:
    if 0 in missing:
        return f"on rank {rank}: {never_arrived(missing, family, traceless)}; rank 0 collects every rank's version"
    if missing:
        return f"on rank {rank}: rank 0 has not delivered the verdict; {never_arrived(missing, family, traceless)}"
    return f"on rank {rank}: every rank has published its version, but rank 0 has not delivered the verdict"


def unaccounted(family: Family, ranks: Sequence[int], grace: float, backend: str, traceless: bool) -> str:
    return (f"{family.title} check (backend {backend}, {CHECK_MODE_ENV}=warn): judged without "
            f"{ranks_phrase(ranks)}, not heard from within the grace period of {grace:g}s ({_silent(traceless)}); "
            "the job goes on, and a rank with the check that arrives later says so.")


def late_mismatch(family: Family, backend: str, came: str, negotiated: int) -> str:
    word = f"{family.version_word} {negotiated}"
    return (f"{family.title} mismatch (backend {backend}): {came}, and the others negotiated {word}, which this "
            f"rank does not speak.\nWhat to do: run this rank on a build that speaks {word}, or restart the job with "
            "every rank on builds that share a version.")


def late_timeout(family: Family, backend: str, came: str, namespace: str, detail: str) -> str:
    return (f"{check_head(family, backend)}: {came}: rank 0 gave up waiting for it and the job did not start "
            f"(or an earlier attempt timed out under {namespace}, the same keys: pass a fresh store prefix per "
            f"attempt). Rank 0's account:\n{detail}")


def reused(family: Family, namespace: str, backend: str) -> str:
    return (f"{check_head(family, backend)}: the store already holds an earlier check under {namespace} (an earlier "
            "attempt that timed out or was killed); this attempt cannot be told apart from it. Pass a fresh store "
            "or a fresh PrefixStore prefix per attempt.")


def error_message(verdict_detail: str, info: RankInfo, family: Family) -> str:
    """The verdict's text, the same on every rank, and one last line about this rank."""
    who = f"rank {info.rank}, worker {info.name}" if info.name else f"rank {info.rank}"
    return (f"{verdict_detail}\nThis rank ({who}, host {info.hostname}) runs "
            f"{range_text(info.version, info.min_version, family.version_word)}.")
