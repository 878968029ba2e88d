"""What ranks write to the store, and how it is read back. Everything read is
JSON, validated field by field, never unpickled or evaluated; unknown fields are
ignored and missing optional ones defaulted, so builds of different ages agree."""

import functools
import importlib.metadata
import json
import platform
import re
import socket
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed._protocol_version._families import Family
from torch.distributed._protocol_version._settings import MAX_VERSION, version_range


__all__ = [
    "InvalidPayload", "RankInfo", "Verdict", "is_setting", "load_object", "local_info",
    "no_check_info", "parse_payload", "setting_payload",
]

# A payload or verdict is at most a few KB; anything far larger is not from this check.
MAX_PAYLOAD_BYTES = 64 * 1024
_MAX_TEXT, _MAX_ITEMS = 128, 4  # characters of a text field; items of a list or object
# A rank that runs no check speaks version 1: the wire of the torch the check came with.
NO_CHECK_VERSION = 1
_STATUSES = ("ok", "mismatch", "invalid", "timeout")
_TEXT_FIELDS = ("torch_version", "hostname", "git_version", "python_version")


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
    checked: bool = True  # False: it went ahead without the check (see no_check_info)
    git_version: str = "unknown"  # the commit torch was built from
    python_version: str = "unknown"
    backend_versions: tuple[tuple[str, str], ...] = ()  # (library, version)
    name: str = ""  # an RPC worker's name

    def to_payload(self, family: Family) -> str:
        """Serialise for the store."""
        fields = {name: getattr(self, name) for name in (*_TEXT_FIELDS, "mode", "name")}
        return json.dumps({"family": family.name, "protocol_version": self.version, "min_protocol_version":
                           self.min_version, "backend_versions": dict(self.backend_versions), **fields})


@functools.cache
def _torch_version() -> str:
    """The installed distribution's version: it tells ``2.13.0+cpu.protocolv2`` from its base."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:  # a source build run in place
        return torch.__version__


def local_info(rank: int, family: Family, mode: str, name: str = "") -> RankInfo:
    """This rank's payload; raises ``SettingError`` on a bad override. Gloo is compiled into
    torch (the commit names it); NCCL is reported where built."""
    minimum, version = version_range(family)
    nccl = torch.distributed.is_nccl_available()
    backends = (("nccl", ".".join(map(str, torch.cuda.nccl.version()))),) if nccl else ()  # type: ignore[no-untyped-call]
    return RankInfo(
        rank, version, minimum, _torch_version(), socket.gethostname(), mode, True,
        torch.version.git_version, platform.python_version(), backends, name,
    )


def no_check_info(rank: int) -> RankInfo:
    """A rank seen building its backend without the check: it speaks version 1."""
    return RankInfo(rank, NO_CHECK_VERSION, NO_CHECK_VERSION, mode="", checked=False)


def setting_payload(error: str) -> str:
    """What a rank whose setting is invalid publishes in place of its payload, before it raises."""
    return json.dumps({"setting_error": error, "hostname": socket.gethostname()})


def is_setting(raw: bytes) -> bool:
    """Whether ``raw`` is a setting payload: its rank has raised, and reads no verdict."""
    try:
        return "setting_error" in load_object(raw)
    except InvalidPayload:
        return False


def load_object(raw: bytes) -> dict[str, Any]:
    """A JSON object of bounded size; raises :class:`InvalidPayload` with the reason."""
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise InvalidPayload(f"{len(raw)} bytes, over the {MAX_PAYLOAD_BYTES}-byte limit")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except RecursionError:  # a RuntimeError: it must not pass for a store failure
        raise InvalidPayload("JSON nested too deeply") from None
    except ValueError as e:  # UnicodeDecodeError included
        raise InvalidPayload(f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise InvalidPayload(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _version(obj: dict[str, Any], name: str, default: int | None = None) -> int:
    value = obj.get(name, default)
    # bool is an int subclass; True is not a protocol version.
    if type(value) is not int or not 0 <= value <= MAX_VERSION:
        raise InvalidPayload(f"{name!r} must be an integer from 0 to 2**63 - 1, got {value!r:.40}")
    return value


def _text(value: object, name: str, limit: int = _MAX_TEXT) -> str:
    """Printable and capped: a field is shown to operators, never trusted."""
    if not isinstance(value, str):
        raise InvalidPayload(f"{name!r} must be a string, got {type(value).__name__}")
    return "".join(ch if ch.isprintable() else "?" for ch in value)[:limit] or "unknown"


def parse_payload(rank: int, raw: bytes) -> RankInfo:
    """Validate one rank's payload; raises :class:`InvalidPayload` with the reason.
    Missing optional fields read as ``error`` mode and ``"unknown"``."""
    obj = load_object(raw)
    if "setting_error" in obj:
        error = _text(obj["setting_error"], "setting_error", 4 * _MAX_TEXT)
        raise InvalidPayload(f"an invalid setting on host {_text(obj.get('hostname', 'unknown'), 'hostname')}: {error}")
    version = _version(obj, "protocol_version")
    min_version = _version(obj, "min_protocol_version", default=version)
    if min_version > version:
        raise InvalidPayload(f"minimum version {min_version} is above its version {version}")
    mode, backends = obj.get("mode", "error"), obj.get("backend_versions", {})
    if mode not in ("error", "warn"):
        raise InvalidPayload(f"'mode' must be 'error' or 'warn', got {mode!r:.40}")
    if not isinstance(backends, dict):
        raise InvalidPayload("'backend_versions' must be an object")
    text = {name: _text(obj.get(name, "unknown"), name) for name in _TEXT_FIELDS}
    return RankInfo(
        rank, version, min_version, text["torch_version"], text["hostname"], mode, True, text["git_version"],
        text["python_version"], tuple((_text(k, "backend_versions"), _text(v, "backend_versions"))
                                      for k, v in sorted(backends.items())[:_MAX_ITEMS]),
        # c10d ranks send an empty name: "unknown" would name a worker that is not there.
        _text(obj["name"], "name") if obj.get("name", "") != "" else "",
    )


@dataclass(frozen=True)
class Verdict:
    """One check's outcome, computed by rank 0 and read by everyone. ``enforce`` is False where every
    checking rank runs ``warn`` (on a pass too, for a rank that comes later): the strictest mode decides."""

    status: str  # one of _STATUSES
    detail: str
    negotiated: int | None
    enforce: bool = True
    without: tuple[int, ...] = ()  # the ranks it was reached without (not heard from in time)
    readers: int = 0  # the ranks that published and read it
    token: str = ""  # rank 0's name for this check, new each time (torchrun's agents pass it to their workers)

    @property
    def ok(self) -> bool:
        return self.negotiated is not None

    @property
    def warned(self) -> bool:  # a mismatch every checking rank runs warn on: init goes on
        return self.status == "mismatch" and not self.enforce

    def to_json(self) -> str:
        return json.dumps({**vars(self), "without": list(self.without)})

    @classmethod
    def from_json(cls, key: str, raw: bytes) -> "Verdict":
        """Parse the verdict read from ``key``; raises :class:`InvalidPayload` naming it."""
        try:
            obj = load_object(raw)
        except InvalidPayload as e:
            raise InvalidPayload(f"the key {key} holds an unreadable verdict ({e})") from None
        status, detail, negotiated = obj.get("status"), obj.get("detail"), obj.get("negotiated")
        without, readers, token = obj.get("without", []), obj.get("readers", 0), obj.get("token", "")
        if status not in _STATUSES or not isinstance(detail, str):
            raise InvalidPayload(f"the key {key} holds a verdict with an unknown status {status!r:.40}")
        if status == "ok" and type(negotiated) is not int:
            raise InvalidPayload(f"the key {key} holds an 'ok' verdict without a negotiated version")
        if not isinstance(without, list) or not all(type(r) is int for r in without) or type(readers) is not int:
            raise InvalidPayload(f"the key {key} holds a verdict with invalid 'without' or 'readers' fields")
        if not isinstance(token, str) or not re.fullmatch(r"[0-9a-f]{0,32}", token):
            raise InvalidPayload(f"the key {key} holds a verdict with an invalid token {token!r:.40}")
        return cls(status, detail, negotiated if status == "ok" else None, obj.get("enforce") is not False,
                   tuple(without), readers, token)
