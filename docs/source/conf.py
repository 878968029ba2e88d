"""Sphinx configuration of the guardrail's pages: ``make docs`` builds them with
MyST, as upstream's docs are built, and warnings are errors (``-W``), so a broken
``{doc}`` link, a bad directive or a public function autodoc cannot import fails
the build (and ``make test``, through test_protocol_version_docs.py)."""

project = "torch.distributed protocol version guardrail"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
# Signatures as written (``dist.Store``, ``timedelta``), not expanded.
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
html_theme = "alabaster"
