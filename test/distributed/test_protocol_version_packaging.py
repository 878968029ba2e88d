# Owner(s): ["oncall: distributed"]
"""The two ways the guardrail leaves this repo: a wheel, and an export to PyTorch.

* The wheel recipe (versions, the edits, what ``wheel pack`` makes of them) on a
  small wheel made at test time: fast, exact.
* The real thing: the pinned upstream wheel is repacked, pip installs it into a
  fresh venv, and real 2-rank gloo jobs run with that venv's interpreter.
* ``protocol_version_hook.py export`` on a scratch PyTorch tree made at test time
  from the installed torch: run twice, the second run changes nothing.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import io
import json
import os
import re
import stat
import subprocess
import sys
import tempfile
import unittest
import zipfile
from pathlib import Path
from typing import Any

from hypothesis import given, settings, strategies as st
from packaging.version import Version
from wheel.wheelfile import WheelFile
from torch.distributed import distributed_c10d
from torch.distributed._protocol_version import PROTOCOL_VERSION
from torch.testing._internal.common_utils import find_free_port, run_tests, TestCase
from torch.testing._internal.distributed.protocol_version_utils import GUARDRAIL_ENVS, MISMATCH, NEXT_VENV, REPO_ROOT


REPO = REPO_ROOT
sys.path.insert(0, str(REPO / "tools"))
import build_patched_wheel as bw
import protocol_version_hook as hook


PROBE = Path(__file__).resolve().parent / "protocol_version_probe.py"
# Where pip finds the pinned CPU wheel on an ordinary machine.
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


INSTALLED = Path(distributed_c10d.__file__).parents[1]  # this interpreter's torch (2.13.0, hooked)
# The other supported release's, hooked: torch 2.14.1 in the venv make test-long creates.
NEXT_INSTALLED = next(NEXT_VENV.glob("lib/python*/site-packages/torch"), None)


def _stock_sources(installed: Path = INSTALLED) -> dict[str, str]:
    """Every hooked file as stock torch has it, from the ``installed`` (patched) ones:
    nothing of PyTorch's is committed."""
    return {rel: hook.unpatch(rel, (installed / rel).read_text(), rel) for rel in hook.TARGETS}


def _write_stock(torch_dir: Path, installed: Path = INSTALLED) -> None:
    for rel, text in _stock_sources(installed).items():
        (torch_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (torch_dir / rel).write_text(text)


def _sha(data: bytes | str) -> str:
    """Compare file contents by digest: TestCase.assertEqual walks bytes one by one
    (seconds for a 250 kB distributed_c10d.py)."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _record_rows(wheel: zipfile.ZipFile, record: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(wheel.read(record).decode())))


def _matches_record(data: bytes, digest: str, size: str) -> bool:
    """Independent of record_hash: decode the recorded digest and compare bytes."""
    mode, _, value = digest.partition("=")
    recorded = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    return mode == "sha256" and recorded == hashlib.sha256(data).digest() and int(size) == len(data)


# --------------------------------------------------------------------------- #
# The recipe, on a small wheel
# --------------------------------------------------------------------------- #

SMALL = "torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl"
OLD_INFO = "torch-2.13.0+cpu.dist-info/"
NEW_INFO = "torch-2.13.0+cpu.protocolv1.dist-info/"
METADATA = (
    "Metadata-Version: 2.4\nName: torch\nVersion: 2.13.0+cpu\n\n"
    "Version: 9 (a line of the description)\n"
)
LIBRARY = bytes(range(256)) * 512
# A local version segment PEP 440 keeps as written: a leading letter, or a number
# without leading zeros.
_SEGMENT = r"(?:[a-z][a-z0-9]{0,11}|0|[1-9][0-9]{0,8})"


def _small_upstream(directory: Path, hooked: dict[str, str]) -> Path:
    """A wheel shaped like torch's: a stored file, the files the hooks go into
    (``hooked``: path in torch/ -> text), an executable, dist-info, a RECORD
    (which ``wheel unpack`` checks)."""
    path = directory / SMALL
    with WheelFile(path, "w") as wheel:
        wheel.writestr("torch/__init__.py", "", zipfile.ZIP_STORED)
        for rel, text in hooked.items():
            wheel.writestr(f"torch/{rel}", text)
        library = zipfile.ZipInfo("torch/lib/libfake.so", (2026, 7, 3, 22, 22, 46))
        library.external_attr = (stat.S_IFREG | 0o755) << 16
        wheel.writestr(library, LIBRARY)
        wheel.writestr(OLD_INFO + "METADATA", METADATA)
        wheel.writestr(OLD_INFO + "WHEEL", "Wheel-Version: 1.0\nTag: cp311-cp311-linux_x86_64\n")
    return path


def _linked_files() -> dict[str, str]:
    """What ``install`` links, as the wheel holds it: path in the wheel -> digest."""
    root = REPO / "torch"
    sources = [root / rel for rel in hook.linked_paths()]
    files = [p for s in sources for p in (s.rglob("*") if s.is_dir() else [s])]
    return {
        f"torch/{path.relative_to(root)}": _sha(path.read_bytes())
        for path in files
        if path.is_file() and "__pycache__" not in path.parts
    }


class TestWheelRecipe(TestCase):
    def test_local_version_extends_the_upstream_label(self) -> None:
        self.assertEqual(bw.local_version("2.13.0+cpu", "protocolv1"), "2.13.0+cpu.protocolv1")
        self.assertEqual(bw.local_version("2.13.0", "protocolv1"), "2.13.0+protocolv1")

    def test_local_version_refuses_what_pep440_rewrites(self) -> None:
        with self.assertRaises(bw.BuildError) as ctx:
            bw.local_version("2.13.0+cpu", "Protocol_V1")
        self.assertExpectedInline(
            str(ctx.exception),
            """'2.13.0+cpu.Protocol_V1' is not in PEP 440 normal form (it reads as '2.13.0+cpu.protocol.v1')""",
        )
        for suffix in ("v1!", "01", "pv-1", ""):
            with self.assertRaises(bw.BuildError, msg=suffix):
                bw.local_version("2.13.0+cpu", suffix)

    @settings(max_examples=200, deadline=None)
    @given(
        upstream=st.sampled_from(["2.13.0+cpu", "2.13.0", "2.14.1+cpu.cxx11", "3.0.0rc1+cpu"]),
        suffix=st.from_regex(rf"{_SEGMENT}(?:\.{_SEGMENT}){{0,2}}", fullmatch=True),
    )
    def test_local_version_rules(self, upstream: str, suffix: str) -> None:
        """Same release, upstream label kept as a prefix, sorts after upstream, normal form."""
        result = bw.local_version(upstream, suffix)
        version, base = Version(result), Version(upstream)
        self.assertEqual(str(version), result)
        self.assertEqual(version.public, base.public)
        self.assertEqual(version.local, f"{base.local}.{suffix}" if base.local else suffix)
        self.assertGreater(version, base)

    def test_versions_lines_are_read_and_rewritten(self) -> None:
        source = (hook.MODULE_SOURCE / bw.VERSIONS_FILE).read_text()
        repo = bw.read_versions(source)
        self.assertEqual(repo.version, PROTOCOL_VERSION)
        newer = bw.ProtocolVersions(version=repo.version + 1, minimum=repo.minimum)
        rewritten = bw.set_versions(source, newer)
        self.assertEqual(bw.read_versions(rewritten), newer)
        changed = [(a, b) for a, b in zip(source.splitlines(), rewritten.splitlines()) if a != b]
        self.assertEqual(
            changed,
            [(f"PROTOCOL_VERSION: int = {repo.version}", f"PROTOCOL_VERSION: int = {newer.version}")],
        )
        self.assertEqual(bw.ProtocolVersions(version=2, minimum=1).label, "protocolv1to2")
        self.assertEqual(bw.ProtocolVersions(version=2, minimum=2).label, "protocolv2")

    def test_versions_refused_clearly(self) -> None:
        with self.assertRaisesRegex(bw.BuildError, "PROTOCOL_VERSION: int = .*found 0"):
            bw.set_versions("PROTOCOL_VERSION = 2\nMIN_PROTOCOL_VERSION: int = 1\n", bw.ProtocolVersions(2, 1))
        with self.assertRaisesRegex(bw.BuildError, "need 1 <= minimum <= version"):
            bw.ProtocolVersions(version=1, minimum=2)

    def test_pins_and_suffix_come_from_the_repo(self) -> None:
        self.assertEqual(bw.pinned_torch_version(REPO / "requirements.txt"), "2.13.0")
        self.assertEqual(bw.default_local_suffix(), f"protocolv{PROTOCOL_VERSION}")

    def test_build_small_wheel(self) -> None:
        stock = _stock_sources()
        with tempfile.TemporaryDirectory() as tmp:
            upstream = _small_upstream(Path(tmp), stock)
            built = bw.build_wheel(upstream, Path(tmp) / "out", "protocolv1")
            self.assertEqual(built.name, "torch-2.13.0+cpu.protocolv1-cp311-cp311-linux_x86_64.whl")
            self.assertEqual(os.listdir(built.parent), [built.name])
            again = bw.build_wheel(upstream, Path(tmp) / "again", "protocolv1")
            self.assertEqual(_sha(again.read_bytes()), _sha(built.read_bytes()), "not reproducible")
            linked = _linked_files()
            with zipfile.ZipFile(built) as wheel, zipfile.ZipFile(upstream) as source:
                self.assertIsNone(wheel.testzip())
                self.assertEqual(
                    sorted(wheel.namelist()),
                    sorted(["torch/__init__.py", *(f"torch/{rel}" for rel in stock), "torch/lib/libfake.so",
                            *linked, NEW_INFO + "METADATA", NEW_INFO + "WHEEL", NEW_INFO + "RECORD"]),
                )
                for rel in hook.TARGETS:
                    self.assertEqual(_sha(wheel.read(f"torch/{rel}")), _sha(hook.patch_file(rel, stock[rel], rel, hook.hooks_of(stock, rel))))
                for name, digest in linked.items():
                    self.assertEqual(_sha(wheel.read(name)), digest, name)
                metadata = wheel.read(NEW_INFO + "METADATA").decode()
                self.assertIn("\nVersion: 2.13.0+cpu.protocolv1\n", metadata)
                self.assertIn("\nVersion: 9 (a line of the description)\n", metadata)
                # Unchanged entries keep content and mode.
                for name in ("torch/__init__.py", "torch/lib/libfake.so"):
                    new, old = wheel.getinfo(name), source.getinfo(name)
                    self.assertEqual(_sha(wheel.read(name)), _sha(source.read(name)))
                    self.assertEqual(new.external_attr >> 16, old.external_attr >> 16, name)
                rows = _record_rows(wheel, NEW_INFO + "RECORD")
                self.assertEqual(sorted(row[0] for row in rows), sorted(wheel.namelist()))
                self.assertEqual(rows[-1], [NEW_INFO + "RECORD", "", ""])
                for name, digest, size in rows[:-1]:
                    self.assertTrue(_matches_record(wheel.read(name), digest, size), name)

    def test_build_other_versions(self) -> None:
        """``--protocol-version 2 --min-protocol-version 1``: a real bridging build."""
        with tempfile.TemporaryDirectory() as tmp:
            upstream = _small_upstream(Path(tmp), _stock_sources())
            out = Path(tmp) / "out"
            with contextlib.redirect_stdout(io.StringIO()):
                code = bw.main(
                    ["--upstream-wheel", str(upstream), "--out-dir", str(out),
                     "--protocol-version", "2", "--min-protocol-version", "1"]
                )
            self.assertEqual(code, 0)
            (built,) = out.iterdir()
            self.assertEqual(built.name, "torch-2.13.0+cpu.protocolv1to2-cp311-cp311-linux_x86_64.whl")
            with zipfile.ZipFile(built) as wheel:
                versions = wheel.read(f"{bw.MODULE}/{bw.VERSIONS_FILE}").decode()
            self.assertEqual(bw.read_versions(versions), bw.ProtocolVersions(version=2, minimum=1))

    def test_failed_build_leaves_no_wheel(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            broken = {**_stock_sources(), hook.TARGETS[0]: "def init_process_group(): pass\n"}
            upstream = _small_upstream(Path(tmp), broken)
            with self.assertRaisesRegex(hook.PatchError, "refusing to patch"):
                bw.build_wheel(upstream, Path(tmp) / "out", "protocolv1")
            self.assertEqual(os.listdir(Path(tmp) / "out"), [])

    def test_missing_upstream_wheel_is_reported(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            with self.assertRaises(bw.BuildError) as ctx:
                bw.find_upstream_wheel("0.0.1", Path(tmp))
        self.assertIn("the pinned upstream wheel torch==0.0.1 (CPU build) is missing", str(ctx.exception))
        self.assertIn("--upstream-wheel PATH", str(ctx.exception))


# --------------------------------------------------------------------------- #
# The real wheel, installed by pip into a fresh venv
# --------------------------------------------------------------------------- #


# Unset for commands run in the venv: the guardrail's variables and PYTHONPATH
# (only the venv may count), and PYTHONDONTWRITEBYTECODE, so that the first torch
# import in the venv leaves bytecode for the next ones (pip installs with
# --no-compile below).
_UNSET = (*GUARDRAIL_ENVS, "PYTHONPATH", "PYTHONDONTWRITEBYTECODE")


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in _UNSET}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


class TestPatchedWheelInstall(TestCase):
    """``make wheel``'s recipe on the pinned wheel, then a plain ``pip install``."""

    tmp: Path
    wheel: Path
    python: Path

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls._tmpdir = tempfile.TemporaryDirectory()
        cls.tmp = Path(cls._tmpdir.name)
        try:
            try:
                upstream = bw.find_upstream_wheel(
                    bw.pinned_torch_version(REPO / "requirements.txt"), bw.DEFAULT_DOWNLOAD_DIR
                )
            except bw.BuildError as e:
                raise unittest.SkipTest(
                    f"{str(e).splitlines()[0]} (outside this team's machines, set "
                    f"PIP_EXTRA_INDEX_URL={CPU_INDEX}, see README)"
                ) from None
            cls.wheel = bw.build_wheel(upstream, cls.tmp / "dist", bw.default_local_suffix())
            _run([sys.executable, "-m", "venv", str(cls.tmp / "venv")], cls.tmp, 120)
            cls.python = cls.tmp / "venv" / "bin" / "python"
            # --no-compile: byte-compiling all of torch takes longer than the rest
            # of this class; the probes' imports compile only what they use.
            install = [str(cls.python), "-m", "pip", "install", "--no-compile", "--quiet"]
            _run([*install, str(cls.wheel)], cls.tmp, 300)
        except BaseException:
            cls._tmpdir.cleanup()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        cls._tmpdir.cleanup()
        super().tearDownClass()

    def probe(self, *args: str) -> Any:
        """Run protocol_version_probe.py with the venv's interpreter; its JSON report."""
        proc = _run([str(self.python), str(PROBE), *args], self.tmp, 240)
        return json.loads(proc.stdout.splitlines()[-1])

    def assert_in_venv(self, path: str) -> None:
        self.assertTrue(Path(path).is_relative_to(self.tmp / "venv"), path)

    def test_pip_check(self) -> None:
        proc = _run([str(self.python), "-m", "pip", "check"], self.tmp, 120)
        self.assertIn("No broken requirements found.", proc.stdout)

    def test_installed_files_match_record_and_repo(self) -> None:
        report = self.probe("inspect")
        evidence, record = report["evidence"], report["record"]
        built = bw.WheelName.parse(self.wheel.name)
        self.assertEqual(evidence["torch_distribution"], built.version)
        self.assert_in_venv(evidence["c10d_file"])
        self.assert_in_venv(evidence["module_file"])
        self.assertFalse(evidence["module_is_symlink"])
        self.assertEqual(
            _sha(Path(evidence["module_file"]).read_bytes()), _sha((hook.MODULE_SOURCE / "__init__.py").read_bytes())
        )
        self.assertTrue(evidence["hook_compiled"])
        self.assertEqual(evidence["mutations"], [])
        with zipfile.ZipFile(self.wheel) as wheel:
            files_in_wheel = len(wheel.namelist()) - 1  # all but RECORD
        self.assertEqual(record["mismatched"], [])
        self.assertGreaterEqual(record["checked"], files_in_wheel)
        self.assertEqual(record["unhashed"], [f"{built.dist_info}RECORD"])

    def test_matching_job_negotiates(self) -> None:
        for result in self.probe("job", "{}", "2", str(find_free_port())):
            self.assertIsNone(result["error_type"], result)
            self.assertEqual(result["exitcode"], 0)
            self.assertEqual(result["value"]["sum"], 2.0)
            self.assertEqual(result["value"]["group_version"], PROTOCOL_VERSION)
            self.assert_in_venv(result["value"]["c10d_file"])

    def test_mismatch_job_every_rank_raises(self) -> None:
        results = self.probe("job", json.dumps({1: PROTOCOL_VERSION + 1}), "2", str(find_free_port()))
        self.assertEqual(len(results), 2)
        for result in results:
            self.assertEqual(result["error_type"], "ProtocolVersionError", result)
            self.assertIn(MISMATCH, result["error"])


# --------------------------------------------------------------------------- #
# Export to a PyTorch checkout
# --------------------------------------------------------------------------- #


def _scratch_checkout(root: Path, installed: Path = INSTALLED) -> Path:
    """The parts of a PyTorch source tree that export reads or recognises, the hooked files
    those of the release ``installed`` is."""
    (root / "torch" / "distributed").mkdir(parents=True)
    (root / "test" / "distributed").mkdir(parents=True)
    (root / "docs" / "source").mkdir(parents=True)
    (root / "setup.py").write_text("")
    (root / hook.TOCTREE_PAGE).write_text("# Distributed communication package\n")
    _write_stock(root / "torch", installed)
    return root


def _snapshot(root: Path) -> dict[str, tuple[bool, int, str]]:
    """Every file under ``root``: whether a symlink, its mode and its content's digest."""
    return {
        str(path.relative_to(root)): (path.is_symlink(), path.lstat().st_mode, _sha(path.read_bytes()))
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _export(checkout: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = hook.main(["export", "--checkout", str(checkout)])
    return code, out.getvalue(), err.getvalue()


# Modules the exported tests load, as upstream runs them (from test/distributed,
# on an installed torch): the file of every module loaded from under this repo.
_IMPORT_EXPORTED_TESTS = """
import json, sys
for name in sys.argv[1:]:
    __import__(name)
print(json.dumps([getattr(m, "__file__", None) for m in list(sys.modules.values())]))
"""
# What a page exported to PyTorch must not name: this repo's make targets and tools.
_FORK_ONLY = re.compile(r"`make |\bmake (demo|test|bench)\b|tools/protocol_version_hook|\.venv")


class TestExportToCheckout(TestCase):
    def test_export_twice_second_run_changes_nothing(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            checkout = _scratch_checkout(Path(tmp))
            code, first, _ = _export(checkout)
            self.assertEqual(code, 0)
            pages = list(hook.exported_pages())
            self.assertEqual(
                first.splitlines(),
                [
                    *(f"updated torch/{rel}" for rel in hook.TARGETS),
                    *(f"created {name}" for name in (*hook.exported_code(), *pages)),
                    f"updated {hook.TOCTREE_PAGE}",
                ],
            )
            stock = _stock_sources()
            for rel in hook.TARGETS:
                self.assertEqual(
                    _sha((checkout / "torch" / rel).read_bytes()),
                    _sha(hook.patch_file(rel, stock[rel], rel, hook.hooks_of(stock, rel))),
                )
            for name in hook.exported_code():
                self.assertFalse((checkout / name).is_symlink(), name)
                self.assertEqual(_sha((checkout / name).read_bytes()), _sha((REPO / name).read_bytes()))
            before = _snapshot(checkout)
            code, out, _ = _export(checkout)
            self.assertEqual(code, 0)
            self.assertEqual(out.splitlines(), [f"unchanged {line.split()[1]}" for line in first.splitlines()])
            self.assertEqual(_snapshot(checkout), before)

    def test_export_applies_to_a_checkout_of_each_supported_release(self) -> None:
        """A checkout built from each release's installed files takes every row of that
        release's hooks, and a second export changes nothing."""
        if NEXT_INSTALLED is None:
            self.skipTest("no torch 2.14.1 environment at .venv-2.14: make test-long creates it")
        for installed, release in ((INSTALLED, "2.13"), (NEXT_INSTALLED, "2.14")):
            with self.subTest(release=release), tempfile.TemporaryDirectory() as tmp:
                checkout = _scratch_checkout(Path(tmp), installed)
                c10d = (checkout / "torch" / hook.C10D_TARGET).read_text()
                self.assertEqual(hook.release_of(c10d, "checkout"), release)
                self.assertEqual(_export(checkout)[0], 0)
                for rel in hook.TARGETS:
                    text = (checkout / "torch" / rel).read_text()
                    rows = [row for row in hook.HOOKS if row.target == rel and release in row.releases]
                    self.assertEqual(text.count(hook.BEGIN), len(rows), rel)
                    self.assertTrue(all(row.is_placed(text, rel) for row in rows), rel)
                first = _snapshot(checkout)
                self.assertEqual(_export(checkout)[0], 0)
                self.assertEqual(_snapshot(checkout), first)

    def test_exported_tree_holds_the_whole_feature(self) -> None:
        code = hook.exported_code()
        self.assertIn("torch/distributed/_protocol_version/__init__.py", code)
        self.assertIn("torch/testing/_internal/distributed/protocol_version_utils.py", code)
        for name in ("test_protocol_version.py", "test_protocol_version_faults.py", "test_protocol_version_ranges.py"):
            self.assertIn(f"test/distributed/{name}", code)
        self.assertNotIn("test/distributed/test_protocol_version_packaging.py", code)

    def test_exported_docs_name_no_fork_tooling_and_are_in_a_toctree(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            checkout = _scratch_checkout(Path(tmp))
            self.assertEqual(_export(checkout)[0], 0)
            pages = list(hook.exported_pages())
            self.assertIn(hook.DOC_PAGE, pages)
            for page in pages:
                text = (checkout / page).read_text()
                self.assertIsNone(_FORK_ONLY.search(text), page)
                self.assertNotIn("fork-only", text)
                for target in re.findall(r"\{doc\}`(?:[^`<]*<)?([^`>]+)>?`", text):
                    self.assertTrue((checkout / "docs" / "source" / f"{target}.md").is_file(), target)
            toctree = (checkout / hook.TOCTREE_PAGE).read_text()
            self.assertIn("```{toctree}", toctree)
            for page in pages:
                self.assertIn(f"\n{Path(page).stem}\n", toctree)

    def test_exported_tests_import_from_the_exported_tree(self) -> None:
        """As upstream runs them: from test/distributed, on an installed torch. Every
        module they load from this repo (through the installed links) must have been
        exported, byte for byte; nothing may come from the repo's test/ or tools/."""
        with tempfile.TemporaryDirectory() as tmp:
            checkout = _scratch_checkout(Path(tmp))
            self.assertEqual(_export(checkout)[0], 0)
            tests = [Path(name).stem for name in hook.exported_code() if name.startswith("test/")]
            proc = _run(
                [sys.executable, "-c", _IMPORT_EXPORTED_TESTS, *tests], checkout / "test" / "distributed", 240
            )
            exported = set(hook.exported_code())
            for file in json.loads(proc.stdout.splitlines()[-1]):
                if file is None or not os.path.isabs(file):  # namespace packages, builtins
                    continue
                real = Path(file).resolve()
                if real.is_relative_to(checkout.resolve()) or real.is_relative_to(Path(sys.prefix).resolve()):
                    continue
                if REPO in real.parents:
                    name = str(real.relative_to(REPO))
                    self.assertIn(name, exported, f"the exported tests load {name}, which is not exported")

    def test_export_replaces_a_link_into_this_repo(self) -> None:
        """After ``install --torch-dir`` on a checkout, the package is a symlink."""
        with tempfile.TemporaryDirectory() as tmp:
            checkout = _scratch_checkout(Path(tmp))
            hook.module_link(checkout / "torch").symlink_to(hook.MODULE_SOURCE)
            repo_before = _sha(b"".join((REPO / n).read_bytes() for n in hook.exported_code()))
            code, out, _ = _export(checkout)
            self.assertEqual(code, 0)
            self.assertIn("updated torch/distributed/_protocol_version/__init__.py", out.splitlines())
            self.assertFalse(hook.module_link(checkout / "torch").is_symlink())
            self.assertEqual(_sha(b"".join((REPO / n).read_bytes() for n in hook.exported_code())), repo_before)

    def test_exported_docs_build_without_warnings(self) -> None:
        """The exported pages, with the toctree entry export adds, build under Sphinx
        and MyST with warnings as errors (a minimal conf.py stands in for PyTorch's)."""
        with tempfile.TemporaryDirectory() as tmp:
            checkout = _scratch_checkout(Path(tmp) / "checkout")
            self.assertEqual(_export(checkout)[0], 0)
            source = checkout / "docs" / "source"
            conf = (REPO / "docs" / "source" / "conf.py").read_text()
            (source / "conf.py").write_text(conf.replace('root_doc = "index"', 'root_doc = "distributed"'))
            build = subprocess.run(
                [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(source), str(Path(tmp) / "html")],
                capture_output=True, text=True, timeout=300,
            )
            self.assertEqual(build.returncode, 0, build.stderr)
            self.assertTrue((Path(tmp) / "html" / "distributed.protocol_version.html").exists())

    def test_export_keeps_a_checkouts_crlf_line_endings_and_a_second_run_changes_nothing(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            checkout = _scratch_checkout(Path(tmp))
            for rel in hook.TARGETS:
                target = checkout / "torch" / rel
                target.write_bytes(target.read_bytes().replace(b"\n", b"\r\n"))
            self.assertEqual(_export(checkout)[0], 0)
            first = _snapshot(checkout)
            self.assertEqual(_export(checkout)[0], 0)
            self.assertEqual(_snapshot(checkout), first)
            for rel in hook.TARGETS:
                data = (checkout / "torch" / rel).read_bytes()
                self.assertEqual(data.count(b"\n"), data.count(b"\r\n"), rel)  # no line ends in a bare LF
                rows = [row for row in hook.HOOKS if row.target == rel]
                self.assertEqual(data.count(hook.BEGIN.encode()), len(rows), rel)

    def test_export_refuses_an_installed_torch(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            _write_stock(Path(tmp) / "torch")
            before = _snapshot(Path(tmp))
            code, out, err = _export(Path(tmp))
            self.assertEqual((code, out), (2, ""))
            self.assertExpectedInline(
                err.replace(tmp, "DIR"),
                """error: refusing to export: DIR does not look like a PyTorch source checkout (it has no setup.py, test/distributed, docs/source/distributed.md)\n""",
            )
            self.assertEqual(_snapshot(Path(tmp)), before)

    def test_export_refuses_an_unknown_c10d_and_writes_nothing(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            checkout = _scratch_checkout(Path(tmp))
            (checkout / "torch" / hook.TARGETS[0]).write_text("def init_process_group(): pass\n")
            before = _snapshot(checkout)
            code, _, err = _export(checkout)
            self.assertEqual(code, 2)
            self.assertIn("refusing to patch", err)
            self.assertEqual(_snapshot(checkout), before)


# --------------------------------------------------------------------------- #
# The hook tool on a torch directory
# --------------------------------------------------------------------------- #

HOOK_TOOL = Path(hook.__file__)


def _tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(HOOK_TOOL), *args], capture_output=True, text=True, timeout=120)


class TestHookTool(TestCase):
    def setUp(self) -> None:
        super().setUp()
        self.torch_dir = Path(self.enterContext(tempfile.TemporaryDirectory())) / "torch"
        for rel in hook.LINKED:
            (self.torch_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        _write_stock(self.torch_dir)

    def test_install_status_revert(self) -> None:
        target = ["--torch-dir", str(self.torch_dir)]
        self.assertEqual(_tool("status", *target).returncode, 1)
        self.assertEqual(_tool("install", *target).returncode, 0)
        status = _tool("status", *target)
        self.assertEqual(status.returncode, 0, status.stdout)
        for rel in hook.linked_paths():
            self.assertEqual((self.torch_dir / rel).resolve(), REPO / "torch" / rel)
        self.assertEqual(_tool("revert", *target).returncode, 0)
        for rel, text in _stock_sources().items():
            self.assertEqual(_sha((self.torch_dir / rel).read_text()), _sha(text), rel)
        self.assertEqual([p for p in hook.linked_paths() if (self.torch_dir / p).is_symlink()], [])
        self.assertEqual(_tool("status", *target).returncode, 1)
        self.assertEqual(_tool("diff", *target).returncode, 2)

    def test_edited_block_is_refused_and_nothing_changes(self) -> None:
        target = ["--torch-dir", str(self.torch_dir)]
        self.assertEqual(_tool("install", *target).returncode, 0)
        c10d = self.torch_dir / hook.TARGETS[0]
        c10d.write_text(c10d.read_text().replace(hook.END, hook.END + " (edited)"))
        before = _snapshot(self.torch_dir)
        for command in ("revert", "install"):
            result = _tool(command, *target)
            self.assertEqual(result.returncode, 2, command)
            self.assertIn("marked block differs", result.stderr)
            self.assertEqual(_snapshot(self.torch_dir), before)
        status = _tool("status", *target)
        self.assertEqual(status.returncode, 1)
        self.assertIn("6 edited", status.stdout)

    def test_a_block_another_version_of_the_tool_wrote_is_refused_with_advice(self) -> None:
        target = self.torch_dir / hook.TARGETS[0]
        target.write_text(target.read_text() + f"{hook.BEGIN}\ncall_something_else()\n{hook.END}\n")
        before = _snapshot(self.torch_dir)
        result = _tool("install", "--torch-dir", str(self.torch_dir))
        self.assertEqual(result.returncode, 2)
        self.assertIn("reinstall torch (make clean-venv)", result.stderr)
        self.assertEqual(_snapshot(self.torch_dir), before)

    def test_unknown_init_rpc_is_refused_and_nothing_changes(self) -> None:
        (self.torch_dir / hook.TARGETS[-1]).write_text("def init_rpc(name): pass\n")
        before = _snapshot(self.torch_dir)
        result = _tool("install", "--torch-dir", str(self.torch_dir))
        self.assertEqual(result.returncode, 2)
        self.assertIn("expected exactly one place in init_rpc", result.stderr)
        self.assertEqual(_snapshot(self.torch_dir), before)

    def test_upstream_edits_to_comments_do_not_move_a_hook(self) -> None:
        """A release that rewrites every comment of the hooked functions (2.14 rewrote the one above
        TorchComms' new_comm) is hooked at the same statements as the one it came from."""
        stock = _stock_sources()
        for rel, text in stock.items():
            lines = text.splitlines(keepends=True)
            for hooked in {h.function for h in hook.HOOKS if h.target == rel}:
                for i in hook._function_lines(text, hooked, rel):
                    if lines[i].lstrip().startswith("#"):
                        lines[i] = lines[i][: len(lines[i]) - len(lines[i].lstrip())] + "# reworded upstream\n"
            (self.torch_dir / rel).write_text("".join(lines))
        self.assertEqual(_tool("install", "--torch-dir", str(self.torch_dir)).returncode, 0)
        status = _tool("status", "--torch-dir", str(self.torch_dir))
        rows = hook.hooks_of(stock, "stock")
        self.assertIn(f"hooks: {len(rows)} present (of {len(rows)})", status.stdout)
        for row in rows:  # the block sits before the same statement, or the comments right above it
            text = (self.torch_dir / row.target).read_text()
            at, indent, newline = row.where(text, row.target)
            rest = text[at:].lstrip()
            while rest.startswith("# reworded upstream"):
                rest = rest.split("\n", 1)[1].lstrip()
            self.assertTrue(rest.startswith(row.at), (row.place, rest[:80]))
            self.assertTrue(text[:at].endswith(row.block(indent, newline)), row.place)

    def test_errors_are_one_line(self) -> None:
        for command in ("status", "diff", "revert", "install"):
            result = _tool(command, "--torch-dir", "/nonexistent")
            self.assertEqual(result.returncode, 2, command)
            self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
            self.assertIn("/nonexistent is not a torch package directory", result.stderr)


if __name__ == "__main__":
    run_tests()
