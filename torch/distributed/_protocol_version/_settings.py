"""This rank's settings, read from the environment and validated before any
store traffic, so a typo fails at once with the variable's name."""

from __future__ import annotations

import os

from torch.distributed._protocol_version._families import Family


__all__ = ["CHECK_MODE_ENV", "CHECK_MODES", "MAX_VERSION", "active_mode", "check_mode", "overrides_set", "version_range"]

CHECK_MODE_ENV = "TORCH_DISTRIBUTED_PROTOCOL_CHECK"
CHECK_MODES = ("error", "warn", "off")
# Versions are stored as signed 64-bit integers by any reader in C++.
MAX_VERSION = 2**63 - 1
_MAX_VERSION_DIGITS = len(str(MAX_VERSION))


class SettingError(RuntimeError):
    """An environment variable of the guardrail holds an invalid value."""


def _parse_version(name: str) -> int | None:
    """Parse a version override; ``None`` when unset. Only ASCII decimal digits
    (``int()`` would take ``"1_0"``, ``"+1"`` or other scripts' digits), the length
    checked before ``int()`` (which refuses thousands of digits unnamed)."""
    raw = os.environ.get(name)
    if raw is None:
        return None
    text = raw.strip()
    significant = text.lstrip("0") or "0"  # leading zeros are harmless: "007" is 7
    valid = text.isascii() and text.isdigit() and len(significant) <= _MAX_VERSION_DIGITS
    if not valid or int(significant) > MAX_VERSION:
        raise SettingError(
            f"{name}={raw[:40]!r}{'...' if len(raw) > 40 else ''} is not a valid protocol "
            f"version: expected a decimal integer from 0 to {MAX_VERSION} (2**63 - 1), "
            "surrounding whitespace allowed."
        )
    return int(significant)


def version_range(family: Family) -> tuple[int, int]:
    """``(minimum, version)`` this rank announces for ``family``; a version override
    alone means "exactly this version", unless the minimum is overridden too."""
    override = _parse_version(family.version_env)
    version = family.version if override is None else override
    min_override = _parse_version(family.min_version_env)
    if min_override is not None:
        minimum = min_override
    else:
        minimum = family.min_version if override is None else version
    if minimum > version:
        raise SettingError(
            f"{family.min_version_env}={minimum} is above this rank's protocol version "
            f"{version}: a build cannot require more than it speaks."
        )
    return minimum, version


def overrides_set(family: Family) -> tuple[str, ...]:
    """The names of ``family``'s override variables that are set on this rank."""
    return tuple(n for n in (family.version_env, family.min_version_env) if n in os.environ)


def check_mode() -> str:
    """``TORCH_DISTRIBUTED_PROTOCOL_CHECK``: ``error`` (default), ``warn`` or ``off``,
    case and surrounding whitespace ignored; anything else is an error."""
    raw = os.environ.get(CHECK_MODE_ENV)
    if raw is None:
        return "error"
    mode = raw.strip().lower()
    if mode not in CHECK_MODES:
        raise SettingError(
            f"{CHECK_MODE_ENV}={raw[:40]!r} is not a valid mode: expected one of "
            f"{', '.join(CHECK_MODES)}."
        )
    return mode


def active_mode(family: Family) -> str | None:
    """This rank's mode for a check of ``family``, or ``None`` when the check is
    off; an invalid setting is an error in every mode."""
    mode = check_mode()
    version_range(family)
    return None if mode == "off" else mode
