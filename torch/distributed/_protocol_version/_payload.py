"""What ranks write to the store, and how it is read back. Everything read is
JSON, validated field by field, never unpickled or evaluated; unknown fields are
ignored and missing optional ones defaulted, so builds of different ages agree."""

from __future__ import annotations

import functools
import importlib.metadata
import json
import platform
import socket
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed._protocol_version._families import Family
from torch.distributed._protocol_version._settings import MAX_VERSION, overrides_set, version_range


__all__ = ["InvalidPayload", "RankInfo", "Verdict", "local_info", "no_check_info", "parse_payload"]

# A payload or verdict is at most a few KB; anything far larger is not from this check.
MAX_PAYLOAD_BYTES = 64 * 1024
_MAX_TEXT_FIELD = 128
_MAX_OVERRIDES = 4
_MAX_BACKEND_VERSIONS = 4
# A rank that runs no check speaks version 1: the wire of the torch the check came with.
NO_CHECK_VERSION = 1
_VERDICT_STATUSES = ("ok", "mismatch", "invalid", "timeout")


class InvalidPayload(ValueError):
    """A rank, or the coordinator, wrote something that is not a valid record."""


@dataclass(frozen=True)
class RankInfo:
    """What one rank announced, or, for a rank that runs no check, what is assumed."""

    rank: int
    version: int
    min_version: int
    torch_version: str = "unknown"
    hostname: str = "unknown"
    mode: str = "error"  # "error" or "warn"
    overrides: tuple[str, ...] = ()  # test-only override variables it had set
    checked: bool = True  # False: it went ahead without the check (see no_check_info)
    git_version: str = "unknown"  # the commit torch was built from
    python_version: str = "unknown"
    backend_versions: tuple[tuple[str, str], ...] = ()  # (library, version)
    name: str = ""  # an RPC worker's name

    def to_payload(self, family: Family) -> str:
        """Serialise for the store."""
        return json.dumps(
            {
                "family": family.name,
                "protocol_version": self.version,
                "min_protocol_version": self.min_version,
                "torch_version": self.torch_version,
                "hostname": self.hostname,
                "mode": self.mode,
                "overrides": list(self.overrides),
                "name": self.name,
                "git_version": self.git_version,
                "python_version": self.python_version,
                "backend_versions": dict(self.backend_versions),
            },
            sort_keys=True,
        )


@functools.cache
def backend_versions() -> tuple[tuple[str, str], ...]:
    """The backend libraries' versions: NCCL's where built (gloo is compiled into
    torch, so the torch commit identifies it)."""
    if not torch.distributed.is_nccl_available():
        return ()
    return (("nccl", ".".join(map(str, torch.cuda.nccl.version()))),)


@functools.cache
def torch_build() -> str:
    """The installed distribution's version, which tells a build repackaged with
    a local label (``2.13.0+cpu.protocolv2``) from the one it came from."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:  # a source build run in place
        return torch.__version__


def local_info(rank: int, family: Family, mode: str, name: str = "") -> RankInfo:
    """This rank's payload; raises ``SettingError`` on a bad override."""
    minimum, version = version_range(family)
    return RankInfo(
        rank=rank,
        version=version,
        min_version=minimum,
        torch_version=torch_build(),
        hostname=socket.gethostname(),
        mode=mode,
        overrides=overrides_set(family),
        git_version=torch.version.git_version,
        python_version=platform.python_version(),
        backend_versions=backend_versions(),
        name=name,
    )


def no_check_info(rank: int) -> RankInfo:
    """A rank seen building its backend without the check: it speaks version 1."""
    return RankInfo(rank, NO_CHECK_VERSION, NO_CHECK_VERSION, mode="", checked=False)


def _as_version(obj: dict[str, Any], name: str, default: int | None = None) -> int:
    value = obj.get(name, default)
    # bool is an int subclass; True is not a protocol version.
    if type(value) is not int or not 0 <= value <= MAX_VERSION:
        raise InvalidPayload(f"{name!r} must be an integer from 0 to 2**63 - 1, got {value!r:.40}")
    return value


def _as_text(obj: dict[str, Any], name: str) -> str:
    value = obj.get(name, "unknown")
    if not isinstance(value, str):
        raise InvalidPayload(f"{name!r} must be a string, got {type(value).__name__}")
    return _clean(value)


def _clean(text: str) -> str:
    """Printable and capped: a field is shown to operators, never trusted."""
    printable = "".join(ch if ch.isprintable() else "?" for ch in text)
    return printable[:_MAX_TEXT_FIELD] or "unknown"


def _as_overrides(obj: dict[str, Any]) -> tuple[str, ...]:
    value = obj.get("overrides", [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidPayload("'overrides' must be a list of variable names")
    return tuple(v[:_MAX_TEXT_FIELD] for v in value[:_MAX_OVERRIDES])


def _as_backend_versions(obj: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    value = obj.get("backend_versions", {})
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise InvalidPayload("'backend_versions' must map library names to version strings")
    items = sorted(value.items())[:_MAX_BACKEND_VERSIONS]
    return tuple((_clean(name), _clean(version)) for name, version in items)


def _load_object(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise InvalidPayload(f"{len(raw)} bytes, over the {MAX_PAYLOAD_BYTES}-byte limit")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except RecursionError:  # a RuntimeError: it must not pass for a store failure
        raise InvalidPayload("JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidPayload(f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise InvalidPayload(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_payload(rank: int, raw: bytes) -> RankInfo:
    """Validate one rank's payload; raises :class:`InvalidPayload` with the reason.
    Missing optional fields read as ``error`` mode, no overrides, ``"unknown"``."""
    obj = _load_object(raw)
    version = _as_version(obj, "protocol_version")
    min_version = _as_version(obj, "min_protocol_version", default=version)
    if min_version > version:
        raise InvalidPayload(f"minimum version {min_version} is above its version {version}")
    mode = obj.get("mode", "error")
    if mode not in ("error", "warn"):
        raise InvalidPayload(f"'mode' must be 'error' or 'warn', got {mode!r:.40}")
    return RankInfo(
        rank=rank,
        version=version,
        min_version=min_version,
        torch_version=_as_text(obj, "torch_version"),
        hostname=_as_text(obj, "hostname"),
        mode=mode,
        overrides=_as_overrides(obj),
        git_version=_as_text(obj, "git_version"),
        python_version=_as_text(obj, "python_version"),
        backend_versions=_as_backend_versions(obj),
        # c10d ranks send an empty name: "unknown" would name a worker that is not there.
        name=_as_text(obj, "name") if obj.get("name", "") != "" else "",
    )


@dataclass(frozen=True)
class Verdict:
    """One check's outcome, computed by rank 0 and read by everyone. ``enforce``
    is False only for a mismatch on which every checking rank runs ``warn``: the
    strictest mode present decides for all ranks."""

    status: str  # one of _VERDICT_STATUSES
    detail: str
    negotiated: int | None
    enforce: bool = True
    partial: bool = False  # a warn rank 0 judged without the ranks it had not heard from

    @property
    def ok(self) -> bool:
        return self.negotiated is not None

    @property
    def warned(self) -> bool:
        """A mismatch every checking rank runs ``warn`` on: init goes on."""
        return self.status == "mismatch" and not self.enforce

    def to_json(self) -> str:
        fields = {"status": self.status, "detail": self.detail, "negotiated": self.negotiated}
        return json.dumps({**fields, "enforce": self.enforce, "partial": self.partial})

    @classmethod
    def from_json(cls, key: str, raw: bytes) -> Verdict:
        """Parse the verdict read from ``key``; raises :class:`InvalidPayload` naming it."""
        try:
            obj = _load_object(raw)
        except InvalidPayload as e:
            raise InvalidPayload(f"the key {key} holds an unreadable verdict ({e})") from None
        status, detail, negotiated = obj.get("status"), obj.get("detail"), obj.get("negotiated")
        if status not in _VERDICT_STATUSES or not isinstance(detail, str):
            raise InvalidPayload(f"the key {key} holds a verdict with an unknown status {status!r:.40}")
        if status == "ok" and type(negotiated) is not int:
            raise InvalidPayload(f"the key {key} holds an 'ok' verdict without a negotiated version")
        return cls(status, detail, negotiated if status == "ok" else None, obj.get("enforce") is not False, obj.get("partial") is True)
