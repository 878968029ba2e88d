"""Real other builds of the fork, each in a venv of its own, for multi-host tests.

A host that runs "protocol version 2" here runs what a bump would ship: the
fork's wheel whose ``_versions.py`` says 2, made by ``tools/build_patched_wheel.py``
and pip-installed into its own venv. No override variable is involved, so the
test also covers how the versions reach the check from the installed files.

Building one takes about 70 s on two cores (repacking 700 MB of torch, then a pip
install), so each venv is kept under ``build/protocol-version-builds/`` (ignored by
git), named by a hash of everything that goes into it: the next test run, and
``make cluster-demo``, reuse it until this repo's torch/ sources, the tools or
the pin change.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from collections.abc import Iterator, Sequence


# This file lives at torch/testing/_internal/distributed/ in the repo; the
# developer install links it into torch, so resolve() finds the repo again.
REPO = Path(__file__).resolve().parents[4]
BUILD_TOOL = REPO / "tools" / "build_patched_wheel.py"
# What the wheel tool copies into torch comes from here (a superset is hashed).
TORCH_SOURCES = REPO / "torch"
CACHE = REPO / "build" / "protocol-version-builds"
# Everything besides those sources that decides a build's content.
_BUILD_INPUTS = (BUILD_TOOL, REPO / "tools" / "protocol_version_hook.py", REPO / "requirements.txt")
_COMPLETE = "complete"


def _name(version: int, minimum: int) -> str:
    return f"protocol-{minimum}-{version}"


def _input_files() -> Iterator[Path]:
    yield from _BUILD_INPUTS
    yield from sorted(p for p in TORCH_SOURCES.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def content_key(version: int, minimum: int) -> str:
    """A hash of the build's inputs: their paths and bytes, the versions, this Python."""
    digest = hashlib.sha256(f"{version} {minimum} {sys.version}".encode())
    for path in _input_files():
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _run(cmd: Sequence[str], what: str) -> None:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if proc.returncode != 0:
        said = (proc.stderr.strip() or proc.stdout.strip())[-3000:]
        raise RuntimeError(f"{what} failed: `{' '.join(cmd)}` exited {proc.returncode}:\n{said}")


def _make_venv(target: Path, version: int, minimum: int) -> None:
    """Build the wheel, then a venv with it and numpy (without numpy every
    ``import torch`` warns); the wheel itself is not kept."""
    with tempfile.TemporaryDirectory(dir=target, prefix=".wheel-") as wheel_dir:
        _run(
            [sys.executable, str(BUILD_TOOL), "--out-dir", wheel_dir,
             "--protocol-version", str(version), "--min-protocol-version", str(minimum)],
            f"building the wheel of protocol versions {minimum}-{version}",
        )
        (wheel,) = Path(wheel_dir).glob("*.whl")
        _run([sys.executable, "-m", "venv", str(target / "venv")], "creating a venv")
        # --no-compile: byte-compiling all of torch takes longer than the install;
        # the first import writes the bytecode it needs.
        _run(
            [str(target / "venv" / "bin" / "python"), "-m", "pip", "install", "--quiet",
             "--no-compile", "--disable-pip-version-check", str(wheel), "numpy"],
            f"installing {wheel.name}",
        )


def build_venv(version: int, minimum: int) -> Path:
    """The venv of the fork's build speaking ``minimum..version``, made if missing.

    A lock per build lets concurrent callers (two test runs, the demo) share the
    work. Older venvs of the same versions go once the new one is complete: each is
    about 1 GB.
    """
    name = _name(version, minimum)
    target = CACHE / f"{name}-{content_key(version, minimum)}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / _COMPLETE).exists():
            shutil.rmtree(target, ignore_errors=True)  # an interrupted build
            target.mkdir()
            _make_venv(target, version, minimum)
            (target / _COMPLETE).touch()
        for stale in CACHE.glob(f"{name}-*"):
            if stale != target:
                shutil.rmtree(stale, ignore_errors=True)
    return target / "venv"


def build_venvs(ranges: Sequence[tuple[int, int]]) -> list[Path]:
    """:func:`build_venv` for each ``(version, minimum)``, side by side: each
    build keeps one core busy."""
    with ThreadPoolExecutor(max_workers=max(len(ranges), 1)) as pool:
        return list(pool.map(lambda r: build_venv(*r), ranges))
