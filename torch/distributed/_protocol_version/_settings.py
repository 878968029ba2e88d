"""This rank's settings, read from the environment and validated before the check waits
for anyone, so a typo fails at once with the variable's name."""

import os

from torch.distributed._protocol_version._families import Family


__all__ = [
    "CHECK_MODE_ENV", "CHECK_MODES", "MAX_VERSION", "SettingError", "check_mode", "parse_version", "version_range",
]

CHECK_MODE_ENV = "TORCH_DISTRIBUTED_PROTOCOL_CHECK"
CHECK_MODES = ("error", "warn", "off")
MAX_VERSION = 2**63 - 1  # versions are signed 64-bit integers to any reader in C++


class SettingError(RuntimeError):
    """An environment variable of the guardrail holds an invalid value."""


def parse_version(name: str, raw: str | None) -> int | None:
    """The version ``raw`` that variable ``name`` holds, ``None`` when unset: ASCII decimal digits only (``int()``
    would take ``"1_0"``, ``"+1"`` or other scripts' digits), length checked first."""
    if raw is None:
        return None
    significant = raw.strip().lstrip("0") or "0"  # leading zeros are harmless: "007" is 7
    if not (raw.strip().isascii() and raw.strip().isdigit() and len(significant) <= len(str(MAX_VERSION))
            and int(significant) <= MAX_VERSION):
        raise SettingError(f"{name}={raw[:40]!r}{'...' if len(raw) > 40 else ''} is not a valid protocol version: "
                           f"expected a decimal integer from 0 to {MAX_VERSION} (2**63 - 1), surrounding whitespace "
                           "allowed.")
    return int(significant)


def version_range(family: Family) -> tuple[int, int]:
    """``(minimum, version)`` this rank announces; a version override alone means "exactly this version"."""
    override, min_override = (parse_version(n, os.environ.get(n)) for n in (family.version_env, family.min_version_env))
    version = family.version if override is None else override
    minimum = min_override if min_override is not None else family.min_version if override is None else version
    if minimum > version:
        raise SettingError(f"{family.min_version_env}={minimum} is above this rank's protocol version {version}: "
                           "a build cannot require more than it speaks.")
    return minimum, version


def check_mode() -> str:
    """``error`` (default), ``warn`` or ``off``, case and surrounding whitespace ignored."""
    raw = os.environ.get(CHECK_MODE_ENV, "error")
    if raw.strip().lower() not in CHECK_MODES:
        expected = ", ".join(CHECK_MODES)
        raise SettingError(f"{CHECK_MODE_ENV}={raw[:40]!r} is not a valid mode: expected one of {expected}.")
    return raw.strip().lower()
