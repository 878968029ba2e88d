#!/usr/bin/env python3
"""Build a deployable torch wheel with the protocol version guardrail in it.

    python tools/build_patched_wheel.py      # or: make wheel
    -> dist/torch-2.13.0+cpu.protocolv1-cp311-cp311-manylinux_2_28_x86_64.whl

Nodes get the guardrail with a plain ``pip install`` of this wheel. It is the
pinned upstream wheel (the ``torch==`` line of requirements.txt, CPU build) with
only these differences:

* ``torch/distributed/distributed_c10d.py`` carries the hook, inserted by the same
  ``patch_source()`` that ``tools/protocol_version_hook.py install`` uses;
* ``torch/distributed/_protocol_version.py`` is a copy of this repo's module (a
  real file: the symlink of the developer install would dangle on a node);
* the local version label gains ``.protocolv<N>`` (``2.13.0+cpu.protocolv1``), so
  pip and ``importlib.metadata`` tell a patched node from a stock one at a glance;
  METADATA, the dist-info directory and the file name follow it;
* RECORD is recomputed for every file.

Entries that do not change are copied as their compressed bytes: deflating the
700 MB of libraries again takes ~45 s on two cores, copying takes seconds. Every
entry is still inflated once, to hash it for RECORD, which also checks its CRC.
"""

from __future__ import annotations

import argparse
import ast
import base64
import csv
import hashlib
import io
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from packaging.version import InvalidVersion, Version

from protocol_version_hook import MODULE_SOURCE, REPO, PatchError, patch_source


C10D = "torch/distributed/distributed_c10d.py"
MODULE = "torch/distributed/_protocol_version.py"
DEFAULT_DOWNLOAD_DIR = REPO / "build" / "upstream-wheels"
DEFAULT_OUT_DIR = REPO / "dist"
_CHUNK = 1 << 20


class BuildError(RuntimeError):
    """The inputs cannot make a correct wheel; the message says which and why."""


# --------------------------------------------------------------------------- #
# Versions and metadata
# --------------------------------------------------------------------------- #


def pinned_torch_version(requirements: Path) -> str:
    """The ``torch==X`` pin of requirements.txt: the one place the base is named."""
    pins = re.findall(r"^torch==(\S+)\s*$", requirements.read_text(), re.MULTILINE)
    if len(pins) != 1:
        raise BuildError(f"expected exactly one 'torch==VERSION' line in {requirements}")
    return pins[0]


def module_protocol_version(source: str) -> int:
    """``PROTOCOL_VERSION`` of the module, read without importing torch."""
    for node in ast.parse(source).body:
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == "PROTOCOL_VERSION"
            and isinstance(node.value, ast.Constant)
            and type(node.value.value) is int
        ):
            return node.value.value
    raise BuildError(f"no 'PROTOCOL_VERSION: int = <literal>' in {MODULE_SOURCE}")


def default_local_suffix() -> str:
    """``protocolv<N>``: the label says which protocol version the build speaks."""
    return f"protocolv{module_protocol_version(MODULE_SOURCE.read_text())}"


def local_version(upstream: str, suffix: str) -> str:
    """``2.13.0+cpu`` + ``protocolv1`` -> ``2.13.0+cpu.protocolv1``.

    The upstream local label is kept and extended, not replaced, so the result
    still says which upstream build it came from, and sorts right after it.
    Refuses a suffix that PEP 440 would rewrite (``-``, ``_``, upper case): the
    file name, METADATA and ``pip list`` must all show the same string.
    """
    base = Version(upstream)
    candidate = f"{base}.{suffix}" if base.local else f"{base}+{suffix}"
    try:
        normalized = str(Version(candidate))
    except InvalidVersion:
        raise BuildError(f"{candidate!r} is not a valid PEP 440 version") from None
    if normalized != candidate:
        raise BuildError(f"{candidate!r} is not in PEP 440 normal form (it reads as {normalized!r})")
    return candidate


def set_metadata_version(metadata: str, version: str) -> str:
    """Replace the ``Version:`` header of METADATA, leaving the rest byte for byte."""
    head, blank, body = metadata.partition("\n\n")
    lines = head.split("\n")
    hits = [i for i, line in enumerate(lines) if line.startswith("Version:")]
    if len(hits) != 1:
        raise BuildError(f"METADATA has {len(hits)} 'Version:' headers, expected 1")
    lines[hits[0]] = f"Version: {version}"
    return "\n".join(lines) + blank + body


def record_hash(sha256_digest: bytes) -> str:
    """RECORD's digest format: ``sha256=`` + urlsafe base64 without padding."""
    return "sha256=" + base64.urlsafe_b64encode(sha256_digest).rstrip(b"=").decode()


def record_text(rows: Iterable[tuple[str, str, int]], record_name: str) -> str:
    """RECORD as CSV: every file with hash and size, RECORD itself unhashed."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerows(rows)
    writer.writerow([record_name, "", ""])
    return out.getvalue()


@dataclass(frozen=True)
class WheelName:
    """``{name}-{version}-{tags}.whl``; ``tags`` keeps any build tag as it is."""

    name: str
    version: str
    tags: str

    @classmethod
    def parse(cls, filename: str) -> WheelName:
        parts = filename.removesuffix(".whl").split("-", 2)
        if not filename.endswith(".whl") or len(parts) != 3:
            raise BuildError(f"{filename!r} is not a wheel file name")
        return cls(*parts)

    def with_version(self, version: str) -> WheelName:
        return WheelName(self.name, version, self.tags)

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}-{self.tags}.whl"

    @property
    def dist_info(self) -> str:
        return f"{self.name}-{self.version}.dist-info/"


# --------------------------------------------------------------------------- #
# Finding the upstream wheel
# --------------------------------------------------------------------------- #


def _is_cpu_build(filename: str, version: str) -> bool:
    try:
        found = Version(WheelName.parse(filename).version)
    except (BuildError, InvalidVersion):
        return False
    return found.public == Version(version).public and (found.local or "").startswith("cpu")


def find_upstream_wheel(version: str, download_dir: Path) -> Path:
    """The CPU wheel of ``torch==version``, fetched by pip as for any install.

    pip looks where this machine's pip configuration says (the team's machines
    keep the wheel on disk, in pip's find-links), so there is no path to keep in
    sync here. Only a CPU build is accepted: a CUDA wheel is 10x the size and not
    what the fork ships.
    """
    download_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", f"torch=={version}", "--no-deps",
        "--only-binary=:all:", "--disable-pip-version-check", "--quiet", "--dest", str(download_dir),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(p for p in download_dir.glob("torch-*.whl") if _is_cpu_build(p.name, version))
    if proc.returncode != 0 or len(found) != 1:
        said = (proc.stderr.strip() or proc.stdout.strip())[-800:] or "nothing"
        raise BuildError(
            f"the pinned upstream wheel torch=={version} (CPU build) is missing: "
            f"`{' '.join(cmd)}` exited {proc.returncode}, found {[p.name for p in found]}; "
            f"pip said: {said}\nPut the wheel where pip finds it (a find-links directory "
            "or an index in pip's configuration) or pass --upstream-wheel PATH."
        )
    return found[0]


# --------------------------------------------------------------------------- #
# Writing the zip
# --------------------------------------------------------------------------- #

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
_CENTRAL_HEADER = struct.Struct("<4s4B4HL2L5H2L")
_END_RECORD = struct.Struct("<4s4H2LH")
_ZIP32_MAX = 0xFFFFFFFF
_UTF8_FLAG = 0x800


def _dos_time(date_time: tuple[int, int, int, int, int, int]) -> tuple[int, int]:
    year, month, day, hour, minute, second = date_time
    return hour << 11 | minute << 5 | second // 2, (year - 1980) << 9 | month << 5 | day


class _ZipWriter:
    """A minimal zip writer that takes entries as already-compressed bytes.

    ``zipfile`` can only add an entry by compressing it itself, which for this
    wheel means deflating 700 MB again. Writes no data descriptors and no zip64
    records (refusing what would need them): the torch wheel needs neither.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._entries: list[zipfile.ZipInfo] = []
        self._names: set[str] = set()

    def add(self, info: zipfile.ZipInfo, compressed: Iterable[bytes]) -> None:
        """Write ``info`` (CRC, sizes and method already set) and its data."""
        if info.filename in self._names:
            raise BuildError(f"duplicate wheel entry {info.filename}")
        self._names.add(info.filename)
        info.header_offset = self._out.tell()
        info.flag_bits = 0 if info.filename.isascii() else _UTF8_FLAG
        if max(info.header_offset, info.compress_size, info.file_size) > _ZIP32_MAX:
            raise BuildError(f"{info.filename} needs zip64, which this writer does not write")
        name = info.filename.encode()
        time_, date = _dos_time(info.date_time)
        self._out.write(
            _LOCAL_HEADER.pack(
                b"PK\x03\x04", 20, 0, info.flag_bits, info.compress_type, time_, date,
                info.CRC, info.compress_size, info.file_size, len(name), 0,
            )
            + name
        )
        written = 0
        for chunk in compressed:
            self._out.write(chunk)
            written += len(chunk)
        if written != info.compress_size:
            raise BuildError(f"{info.filename}: wrote {written} bytes, expected {info.compress_size}")
        self._entries.append(info)

    def close(self) -> None:
        """Write the central directory and the end record."""
        start = self._out.tell()
        for info in self._entries:
            name = info.filename.encode()
            time_, date = _dos_time(info.date_time)
            self._out.write(
                _CENTRAL_HEADER.pack(
                    b"PK\x01\x02", 20, info.create_system, 20, 0, info.flag_bits,
                    info.compress_type, time_, date, info.CRC, info.compress_size,
                    info.file_size, len(name), 0, 0, 0, 0, info.external_attr, info.header_offset,
                )
                + name
            )
        size = self._out.tell() - start
        if len(self._entries) > 0xFFFF or start + size > _ZIP32_MAX:
            raise BuildError("the wheel needs zip64, which this writer does not write")
        count = len(self._entries)
        self._out.write(_END_RECORD.pack(b"PK\x05\x06", 0, 0, count, count, size, start, 0))


def _raw_data(wheel: BinaryIO, info: zipfile.ZipInfo) -> Iterator[bytes]:
    """The compressed bytes of one entry of ``wheel``, as stored."""
    wheel.seek(info.header_offset)
    header = _LOCAL_HEADER.unpack(wheel.read(_LOCAL_HEADER.size))
    if header[0] != b"PK\x03\x04":
        raise BuildError(f"{info.filename}: no local file header at offset {info.header_offset}")
    wheel.seek(info.header_offset + _LOCAL_HEADER.size + header[10] + header[11])
    left = info.compress_size
    while left:
        chunk = wheel.read(min(_CHUNK, left))
        if not chunk:
            raise BuildError(f"{info.filename}: the upstream wheel is truncated")
        left -= len(chunk)
        yield chunk


def _hash_entry(source: zipfile.ZipFile, info: zipfile.ZipInfo) -> str:
    """RECORD digest of one entry's content; zipfile checks the CRC on the way."""
    digest = hashlib.sha256()
    with source.open(info) as data:
        while chunk := data.read(_CHUNK):
            digest.update(chunk)
    return record_hash(digest.digest())


def _copied_info(info: zipfile.ZipInfo, name: str) -> zipfile.ZipInfo:
    copy = zipfile.ZipInfo(name, info.date_time)
    copy.compress_type, copy.create_system = info.compress_type, info.create_system
    copy.CRC, copy.compress_size, copy.file_size = info.CRC, info.compress_size, info.file_size
    copy.external_attr = info.external_attr
    return copy


def _deflated(like: zipfile.ZipInfo, name: str, data: bytes) -> tuple[zipfile.ZipInfo, list[bytes]]:
    """A new entry holding ``data``, with the mode and timestamp of ``like``."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    compressed = compressor.compress(data) + compressor.flush()
    info = _copied_info(like, name)
    info.compress_type, info.CRC = zipfile.ZIP_DEFLATED, zlib.crc32(data)
    info.compress_size, info.file_size = len(compressed), len(data)
    return info, [compressed]


# --------------------------------------------------------------------------- #
# The build
# --------------------------------------------------------------------------- #

_Row = tuple[str, str, int]


def _add_bytes(writer: _ZipWriter, like: zipfile.ZipInfo, name: str, data: bytes) -> _Row:
    writer.add(*_deflated(like, name, data))
    return name, record_hash(hashlib.sha256(data).digest()), len(data)


def _add_upstream(
    writer: _ZipWriter,
    source: zipfile.ZipFile,
    raw: BinaryIO,
    info: zipfile.ZipInfo,
    name: str,
    replaced: dict[str, bytes],
) -> _Row:
    """Copy one upstream entry as ``name``, or write its replacement; returns its RECORD row."""
    if info.filename in replaced:
        return _add_bytes(writer, info, name, replaced[info.filename])
    writer.add(_copied_info(info, name), _raw_data(raw, info))
    return name, _hash_entry(source, info), info.file_size


def _replacements(source: zipfile.ZipFile, old_dist_info: str, version: str) -> dict[str, bytes]:
    """New content for the upstream entries that change, by upstream name."""
    c10d = source.read(C10D).decode()
    metadata = source.read(old_dist_info + "METADATA").decode()
    return {
        C10D: patch_source(c10d, f"{C10D} in the upstream wheel").encode(),
        old_dist_info + "METADATA": set_metadata_version(metadata, version).encode(),
    }


def _write_wheel(
    source: zipfile.ZipFile, raw: BinaryIO, out: BinaryIO, old: WheelName, new: WheelName
) -> None:
    """Package files first, then our module, then dist-info (renamed), RECORD last."""
    if old.dist_info + "METADATA" not in source.NameToInfo:
        raise BuildError(f"the upstream wheel has no {old.dist_info}METADATA")
    if MODULE in source.NameToInfo:
        raise BuildError(f"the upstream wheel already ships {MODULE}")
    replaced = _replacements(source, old.dist_info, new.version)
    old_record = source.getinfo(old.dist_info + "RECORD")
    infos = [i for i in source.infolist() if i is not old_record]
    writer = _ZipWriter(out)
    rows = [
        _add_upstream(writer, source, raw, i, i.filename, replaced)
        for i in infos
        if not i.filename.startswith(old.dist_info)
    ]
    rows.append(_add_bytes(writer, source.getinfo(C10D), MODULE, MODULE_SOURCE.read_bytes()))
    rows += [
        _add_upstream(writer, source, raw, i, new.dist_info + i.filename[len(old.dist_info):], replaced)
        for i in infos
        if i.filename.startswith(old.dist_info)
    ]
    record = new.dist_info + "RECORD"
    _add_bytes(writer, old_record, record, record_text(rows, record).encode())
    writer.close()


def build_wheel(upstream: Path, out_dir: Path, suffix: str) -> Path:
    """Write the patched wheel into ``out_dir``; returns its path.

    The wheel appears under its final name only once complete, so a failed or
    interrupted build never leaves a wheel that pip would take.
    """
    old = WheelName.parse(upstream.name)
    new = old.with_version(local_version(old.version, suffix))
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".building-", suffix=".whl")
    try:
        with zipfile.ZipFile(upstream) as source, upstream.open("rb") as raw, os.fdopen(fd, "wb") as out:
            _write_wheel(source, raw, out, old, new)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 is wrong for an artifact to ship
        target = out_dir / new.filename
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream-wheel", type=Path, help="default: the pin, fetched by pip download")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--download-dir", type=Path, default=DEFAULT_DOWNLOAD_DIR)
    parser.add_argument("--local-suffix", help="default: protocolv<PROTOCOL_VERSION of the module>")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        suffix = args.local_suffix or default_local_suffix()
        upstream = args.upstream_wheel or find_upstream_wheel(
            pinned_torch_version(REPO / "requirements.txt"), args.download_dir
        )
        wheel = build_wheel(upstream, args.out_dir, suffix)
    except (BuildError, PatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"built {wheel} ({wheel.stat().st_size / 1e6:.1f} MB) from {upstream.name} "
        f"in {time.monotonic() - started:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
