#!/usr/bin/env python3
"""Build a deployable torch wheel with the protocol version guardrail in it.

    python tools/build_patched_wheel.py      # or: make wheel
    -> dist/torch-2.13.0+cpu.protocolv1-cp311-cp311-manylinux_2_28_x86_64.whl
    python tools/build_patched_wheel.py --protocol-version 2 --min-protocol-version 1
    -> dist/torch-2.13.0+cpu.protocolv1to2-cp311-cp311-manylinux_2_28_x86_64.whl

Nodes get the guardrail with a plain ``pip install`` of this wheel. It is the
pinned upstream wheel (the ``torch==`` line of requirements.txt, CPU build) with
only these differences:

* the hooked files (``distributed_c10d.py``, ``elastic/agent/server/api.py``,
  ``rpc/__init__.py``) carry their
  hooks, inserted by the same ``apply_hooks()`` that ``tools/protocol_version_hook.py
  install`` uses;
* what ``install`` links into torch is copied in, as real files (a symlink would
  dangle on a node): the ``torch/distributed/_protocol_version/`` package, and
  the shared helpers under ``torch/testing/_internal/distributed/``, where
  upstream's wheel keeps its own;
* with ``--protocol-version``/``--min-protocol-version``, the package's
  ``_versions.py`` says other versions: a real other build, as a bump would make
  it, for tests that mix builds across hosts without any override variable;
* the local version label gains ``.protocolv<N>`` (``.protocolv<M>to<N>`` for a
  build that accepts older versions too), so pip and ``importlib.metadata`` tell
  the builds apart at a glance; METADATA, the dist-info directory and the file
  name follow it.

The zip work is the ``wheel`` package's: ``wheel unpack``, the edits above, then
``wheel pack``, which writes a fresh RECORD. ``SOURCE_DATE_EPOCH`` pins every
entry's timestamp, so the same inputs give the same bytes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from packaging.version import InvalidVersion, Version

from protocol_version_hook import apply_hooks, linked_paths, MODULE_SOURCE, PACKAGE, PatchError, REPO


MODULE = f"torch/{PACKAGE}"
VERSIONS_FILE = "_versions.py"
DEFAULT_DOWNLOAD_DIR = REPO / "build" / "upstream-wheels"
DEFAULT_OUT_DIR = REPO / "dist"
# 1980-01-01, the earliest time a zip entry can hold; used unless the caller sets
# SOURCE_DATE_EPOCH itself.
DEFAULT_SOURCE_DATE_EPOCH = "315532800"


class BuildError(RuntimeError):
    """The inputs cannot make a correct wheel; the message says which and why."""


# --------------------------------------------------------------------------- #
# Versions
# --------------------------------------------------------------------------- #


def pinned_torch_version(requirements: Path) -> str:
    """The ``torch==X`` pin of requirements.txt: the one place the base is named."""
    pins = re.findall(r"^torch==(\S+)\s*$", requirements.read_text(), re.MULTILINE)
    if len(pins) != 1:
        raise BuildError(f"expected exactly one 'torch==VERSION' line in {requirements}")
    return pins[0]


@dataclass(frozen=True)
class ProtocolVersions:
    """What a build speaks: ``version``, and the oldest it accepts, ``minimum``."""

    version: int
    minimum: int

    def __post_init__(self) -> None:
        if not 1 <= self.minimum <= self.version:
            raise BuildError(
                f"protocol version {self.version} with minimum {self.minimum}: "
                "need 1 <= minimum <= version"
            )

    @property
    def label(self) -> str:
        """``protocolv2``, or ``protocolv1to2`` for a build that also accepts 1."""
        if self.minimum == self.version:
            return f"protocolv{self.version}"
        return f"protocolv{self.minimum}to{self.version}"


# The two lines of _versions.py a bump edits, as written there. An exact line,
# not a parse: a reviewer reads the same line the tool rewrites.
_VERSION_LINES = {
    "version": re.compile(r"^PROTOCOL_VERSION: int = (\d+)$", re.MULTILINE),
    "minimum": re.compile(r"^MIN_PROTOCOL_VERSION: int = (\d+)$", re.MULTILINE),
}


def _version_line(source: str, field: str, origin: str) -> re.Match[str]:
    matches = list(_VERSION_LINES[field].finditer(source))
    if len(matches) != 1:
        raise BuildError(
            f"expected exactly one line matching {_VERSION_LINES[field].pattern!r} in "
            f"{origin}, found {len(matches)}; the wheel tool reads and rewrites that line"
        )
    return matches[0]


def read_versions(source: str, origin: str = VERSIONS_FILE) -> ProtocolVersions:
    """The versions that ``_versions.py`` (given as ``source``) declares."""
    values = {field: int(_version_line(source, field, origin).group(1)) for field in _VERSION_LINES}
    return ProtocolVersions(**values)


def set_versions(source: str, versions: ProtocolVersions, origin: str = VERSIONS_FILE) -> str:
    """``source`` with its two version lines saying ``versions``; the rest unchanged."""
    for field in _VERSION_LINES:
        line = _version_line(source, field, origin)
        start, end = line.span(1)
        source = source[:start] + str(getattr(versions, field)) + source[end:]
    return source


def repo_versions() -> ProtocolVersions:
    """The versions this repo's package declares."""
    path = MODULE_SOURCE / VERSIONS_FILE
    return read_versions(path.read_text(), str(path))


def default_local_suffix() -> str:
    """``protocolv<N>``: the label says which protocol version the build speaks."""
    return repo_versions().label


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
    def unpacked(self) -> str:
        """The directory ``wheel unpack`` makes for this wheel."""
        return f"{self.name}-{self.version}"

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
    # Each call fetches into a directory of its own, then moves the whole wheel in: concurrent builds (the cluster
    # tests make two at once) never read a wheel another pip is still writing.
    with tempfile.TemporaryDirectory(dir=download_dir, prefix=".download-") as private:
        cmd = [
            sys.executable, "-m", "pip", "download", f"torch=={version}", "--no-deps",
            "--only-binary=:all:", "--disable-pip-version-check", "--quiet", "--dest", private,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        for wheel in Path(private).glob("torch-*.whl"):
            os.replace(wheel, download_dir / wheel.name)
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
# The build
# --------------------------------------------------------------------------- #


def _wheel_command(*args: str) -> None:
    """Run ``python -m wheel ARGS``: the ecosystem's tool, through its CLI."""
    env = {"SOURCE_DATE_EPOCH": DEFAULT_SOURCE_DATE_EPOCH, **os.environ}
    proc = subprocess.run(
        [sys.executable, "-m", "wheel", *args], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        said = (proc.stderr.strip() or proc.stdout.strip())[-2000:]
        raise BuildError(f"`wheel {' '.join(args)}` exited {proc.returncode}: {said}")


def _copy_in(rel: Path, torch_dir: Path) -> None:
    """Copy ``rel`` (a file or a package) from this repo's torch/ into ``torch_dir``."""
    source, target = REPO / "torch" / rel, torch_dir / rel
    if target.exists():
        raise BuildError(f"the upstream wheel already ships torch/{rel}")
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        shutil.copy(source, target)


def _edit_tree(root: Path, versions: ProtocolVersions | None) -> None:
    """The guardrail's changes to an unpacked torch wheel at ``root``."""
    torch_dir = root / "torch"
    apply_hooks(torch_dir)
    for rel in linked_paths():
        _copy_in(rel, torch_dir)
    if versions is not None:
        path = torch_dir / PACKAGE / VERSIONS_FILE
        path.write_text(set_versions(path.read_text(), versions, f"{MODULE}/{VERSIONS_FILE}"))


def build_wheel(
    upstream: Path, out_dir: Path, suffix: str, versions: ProtocolVersions | None = None
) -> Path:
    """Write the patched wheel into ``out_dir``; returns its path.

    ``versions`` rewrites the package's ``_versions.py`` (``None`` keeps this
    repo's). The wheel is packed in a scratch directory inside ``out_dir`` and
    appears under its final name only once complete, so a failed or interrupted
    build never leaves a wheel that pip would take.
    """
    old = WheelName.parse(upstream.name)
    new = old.with_version(local_version(old.version, suffix))
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".building-") as scratch:
        _wheel_command("unpack", "--dest", scratch, str(upstream))
        root = Path(scratch) / old.unpacked
        _edit_tree(root, versions)
        packed = Path(scratch) / "packed"
        packed.mkdir()
        local_label = new.version.partition("+")[2]
        _wheel_command("pack", "--dest-dir", str(packed), "--local-version", local_label, str(root))
        built = packed / new.filename
        if not built.is_file():
            made = [p.name for p in packed.iterdir()]
            raise BuildError(f"`wheel pack` made {made}, expected {new.filename}")
        target = out_dir / new.filename
        os.replace(built, target)
    return target


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive protocol version")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream-wheel", type=Path, help="default: the pin, fetched by pip download")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--download-dir", type=Path, default=DEFAULT_DOWNLOAD_DIR)
    parser.add_argument(
        "--protocol-version", type=_positive_int, help="PROTOCOL_VERSION of the build (default: the repo's)"
    )
    parser.add_argument(
        "--min-protocol-version", type=_positive_int,
        help="MIN_PROTOCOL_VERSION of the build (default: the repo's)",
    )
    parser.add_argument("--local-suffix", help="default: protocolv<N>, or protocolv<MIN>to<N>")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        repo = repo_versions()
        versions = ProtocolVersions(
            repo.version if args.protocol_version is None else args.protocol_version,
            repo.minimum if args.min_protocol_version is None else args.min_protocol_version,
        )
        upstream = args.upstream_wheel or find_upstream_wheel(
            pinned_torch_version(REPO / "requirements.txt"), args.download_dir
        )
        wheel = build_wheel(upstream, args.out_dir, args.local_suffix or versions.label, versions)
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
