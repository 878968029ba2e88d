# Owner(s): ["oncall: distributed"]
"""The guardrail's pages build with Sphinx and MyST, warnings as errors.

``make docs`` runs the same build; here it runs into a temporary directory, so
that ``make test`` fails on a broken ``{doc}`` link, a bad directive or a public
function that autodoc cannot document.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from sphinx.util.inventory import InventoryFile

import torch.distributed._protocol_version as pv
from torch.testing._internal.common_utils import run_tests, TestCase


SOURCE = Path(__file__).resolve().parents[2] / "docs" / "source"
PAGE = "distributed.protocol_version.md"


def build(source: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """What ``make docs`` runs."""
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(source), str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


class TestDocs(TestCase):
    def setUp(self) -> None:
        super().setUp()
        tmp = tempfile.TemporaryDirectory(prefix="pv-docs-")
        self.addCleanup(tmp.cleanup)
        self.tmp = Path(tmp.name)

    def test_pages_build_without_warnings_and_document_every_public_function(self) -> None:
        result = build(SOURCE, self.tmp / "html")
        self.assertEqual(result.returncode, 0, result.stderr)
        with open(self.tmp / "html" / "objects.inv", "rb") as f:
            inventory = InventoryFile.load(f, "", lambda base, uri: uri)
        documented = set(inventory.get("py:function", {})) | set(inventory.get("py:exception", {}))
        public = {
            f"{pv.__name__}.{name}" for name in pv.__all__ if callable(getattr(pv, name))
        }
        self.assertEqual(public - documented, set())

    def test_a_broken_doc_link_fails_the_build(self) -> None:
        source = self.tmp / "source"
        shutil.copytree(SOURCE, source)
        with open(source / PAGE, "a") as f:
            f.write("\nSee {doc}`no_such_page`.\n")
        result = build(source, self.tmp / "html")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("unknown document", result.stderr)


if __name__ == "__main__":
    run_tests()
