#!/usr/bin/env python3
"""Insert the protocol version guardrail into an installed torch, or take it out.

The fork ships no copy of PyTorch's source. Instead this tool edits the installed
``torch/distributed/distributed_c10d.py`` in place: it adds a few marked lines to
``init_process_group`` that call our package, right before the default group's
backend is built, and links the files of ``LINKED`` (the package, and the helpers
that the tests, the demo and the benchmarks share) from this repo into the
installed torch, so edits to the repo take effect without a reinstall.
Everything it inserts sits between two marker comments, which is how ``revert``
and ``diff`` find it again.

    python tools/protocol_version_hook.py install   # idempotent
    python tools/protocol_version_hook.py status    # exit 0 when installed
    python tools/protocol_version_hook.py diff      # the change, as a unified diff
    python tools/protocol_version_hook.py revert    # back to stock
    python tools/protocol_version_hook.py export --checkout DIR  # into a PyTorch source tree

``--torch-dir DIR`` points at a ``torch`` package directory instead of the one
this interpreter imports. The wheel tool reuses the edit itself by importing
``patch_source``. The tool refuses, without changing anything, a
``distributed_c10d.py`` whose ``init_process_group`` does not have the shape it
knows, and a marked block that was edited by hand. Errors are one line on stderr
and exit code 2.
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import importlib.util
import re
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
# The package, relative to a torch directory (here: this repo's torch/).
PACKAGE = Path("distributed/_protocol_version")
MODULE_SOURCE = REPO / "torch" / PACKAGE
# What install links into a torch directory (glob patterns), each at the same
# path relative to it as in this repo's torch/: the package, and the helpers that
# the tests, the demo, the benchmarks and the tools share (upstream keeps its own
# distributed test helpers in torch/testing/_internal/distributed, so every
# caller imports them the same way).
LINKED = (str(PACKAGE), "testing/_internal/distributed/protocol_version*.py")

BEGIN = "# BEGIN protocol version guardrail (tools/protocol_version_hook.py)"
END = "# END protocol version guardrail"
HOOK_BODY = (
    "from torch.distributed._protocol_version import _check_protocol_version",
    "",
    "_check_protocol_version(store, rank, world_size, timeout, backend)",
)
# init_process_group, non-MPI branch (torch 2.13): the store is final (the caller's,
# or the rendezvous store wrapped in PrefixStore("default_pg")) and the backend is
# built by the very next statement. The hook goes between the two.
ANCHOR_BEFORE = '            store = PrefixStore("default_pg", store)\n\n'
ANCHOR_AT = "        default_pg, _ = _new_process_group_helper(\n            world_size,\n"
INDENT = " " * 8


class PatchError(RuntimeError):
    """The target is not something this tool knows how to change; nothing was changed."""


def hook_block() -> str:
    lines = [BEGIN, *HOOK_BODY, END]
    return "".join(f"{INDENT}{line}\n" if line else "\n" for line in lines) + "\n"


def is_patched(source: str) -> bool:
    return BEGIN in source


def patch_source(source: str, origin: str = "distributed_c10d.py") -> str:
    """Return ``source`` with the hook inserted; unchanged if already there."""
    if is_patched(source):
        return source
    anchor = ANCHOR_BEFORE + ANCHOR_AT
    count = source.count(anchor)
    if count != 1:
        raise PatchError(
            f"refusing to patch {origin}: expected exactly one place in "
            "init_process_group where the default store is wrapped in "
            'PrefixStore("default_pg", ...) right before the backend is built, found '
            f"{count}. This tool knows torch 2.13's init_process_group; port the "
            "anchor in tools/protocol_version_hook.py to this torch first."
        )
    at = source.index(anchor) + len(ANCHOR_BEFORE)
    return source[:at] + hook_block() + source[at:]


def unpatch_source(source: str, origin: str = "distributed_c10d.py") -> str:
    """Return ``source`` with the hook block removed (stock text).

    Only the exact block that ``patch_source`` inserts is removed: a block edited
    by hand is refused rather than left half in place.
    """
    if not is_patched(source):
        return source
    stock = source.replace(hook_block(), "", 1)
    if is_patched(stock):
        raise PatchError(
            f"refusing to change {origin}: its marked block differs from the one this "
            "tool inserts (edited by hand?); restore the block or reinstall torch"
        )
    return stock


def find_torch_dir() -> Path:
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        raise PatchError("torch is not installed in this environment")
    return Path(spec.origin).parent


def c10d_path(torch_dir: Path) -> Path:
    return torch_dir / "distributed" / "distributed_c10d.py"


def module_link(torch_dir: Path) -> Path:
    return torch_dir / PACKAGE


def _read_c10d(torch_dir: Path) -> tuple[Path, str]:
    """The target file and its text; a clear error when ``torch_dir`` is not torch."""
    target = c10d_path(torch_dir)
    if not target.is_file():
        raise PatchError(f"{torch_dir} is not a torch package directory: it has no {target.relative_to(torch_dir)}")
    return target, target.read_text()


def linked_paths() -> list[Path]:
    """What ``LINKED`` names in this repo now, relative to its torch/."""
    root = REPO / "torch"
    return sorted(path.relative_to(root) for pattern in LINKED for path in root.glob(pattern))


def _installed_links(torch_dir: Path) -> list[Path]:
    """The links that ``LINKED`` names in ``torch_dir``, dangling ones included."""
    links = []
    for pattern in map(Path, LINKED):
        parent = torch_dir / pattern.parent
        if parent.is_dir():
            links += [p for p in parent.iterdir() if p.is_symlink() and fnmatch.fnmatch(p.name, pattern.name)]
    return links


def _link_state(torch_dir: Path, rel: Path) -> str:
    """``linked``, ``missing``, or what is in the way of the link."""
    link = torch_dir / rel
    if link.is_symlink():
        return "linked" if link.resolve() == (REPO / "torch" / rel).resolve() else "linked elsewhere"
    return "not a link" if link.exists() else "missing"


def _remove_stale_module_file(torch_dir: Path) -> None:
    """An install made before the module became a package linked a single file."""
    stale = torch_dir / "distributed" / "_protocol_version.py"
    if stale.is_symlink():
        stale.unlink()


def install(torch_dir: Path) -> str:
    target, source = _read_c10d(torch_dir)
    unpatch_source(source, str(target))  # refuses a block edited by hand
    patched = patch_source(source, str(target))
    linked = linked_paths()
    blocked = [str(rel) for rel in linked if _link_state(torch_dir, rel) == "not a link"]
    if blocked:
        raise PatchError(f"refusing to install: {', '.join(blocked)} in {torch_dir} exist and are not links")
    _remove_stale_module_file(torch_dir)
    for link in _installed_links(torch_dir):  # links to files since removed go too
        link.unlink()
    for rel in linked:
        (torch_dir / rel).symlink_to(REPO / "torch" / rel, target_is_directory=(REPO / "torch" / rel).is_dir())
    state = "already installed in" if patched == source else "installed the hook in"
    if patched != source:
        target.write_text(patched)
    return f"{state} {target}; linked {len(linked)} paths to {REPO / 'torch'}"


def revert(torch_dir: Path) -> str:
    """Remove the hook and the links, then check that neither is left."""
    target, source = _read_c10d(torch_dir)
    stock = unpatch_source(source, str(target))
    if stock != source:
        target.write_text(stock)
    for link in _installed_links(torch_dir):
        link.unlink()
    left = [str(link) for link in _installed_links(torch_dir)]
    if is_patched(target.read_text()) or left:
        raise PatchError(f"revert did not take in {torch_dir}: hook or links {left} remain")
    return f"reverted {target} to stock; removed the links"


def status(torch_dir: Path) -> tuple[bool, str]:
    """Whether the hook (exactly as this tool inserts it) and every link are in
    place, and a one-line report."""
    _, source = _read_c10d(torch_dir)
    hook = "present" if hook_block() in source else "edited" if is_patched(source) else "absent"
    states = {rel: _link_state(torch_dir, rel) for rel in linked_paths()}
    wrong = [f"{rel} {state}" for rel, state in states.items() if state != "linked"]
    installed = hook == "present" and not wrong
    links = ", ".join(wrong) if wrong else f"all {len(states)} links in place"
    return installed, f"hook {hook}; {links}"


def diff(torch_dir: Path) -> str:
    target, patched = _read_c10d(torch_dir)
    if not is_patched(patched):
        raise PatchError(f"the hook is not installed in {target}")
    return "".join(
        difflib.unified_diff(
            unpatch_source(patched, str(target)).splitlines(keepends=True),
            patched.splitlines(keepends=True),
            "a/torch/distributed/distributed_c10d.py",
            "b/torch/distributed/distributed_c10d.py",
        )
    )


# --------------------------------------------------------------------------- #
# Export to a PyTorch source checkout
# --------------------------------------------------------------------------- #

# The page that gets a toctree listing the exported pages.
TOCTREE_PAGE = "docs/source/distributed.md"
# What a PyTorch source checkout has and an installed torch does not.
CHECKOUT_MARKERS = ("setup.py", "torch/distributed/distributed_c10d.py", "test/distributed", TOCTREE_PAGE)
# The feature's page; every page it links with {doc} goes along.
DOC_PAGE = "docs/source/distributed.protocol_version.md"
# Files about this fork's own delivery (the wheel, the export, the hook tool, real
# other builds of the fork): no meaning in a PyTorch tree, where the change is in
# the source. Glob patterns on file names.
FORK_ONLY_FILES = (
    "test_protocol_version_packaging.py",
    "test_protocol_version_mutation.py",
    "protocol_version_builds.py",
    "*cluster*",
)
# In a page, what lies between these lines is about this fork (its make targets
# and tools) and is left out of the export.
FORK_ONLY_BEGIN = "<!-- fork-only -->"
FORK_ONLY_END = "<!-- /fork-only -->"


def exported_code() -> list[str]:
    """The package, the shared test helpers, and the tests that make sense upstream."""
    sources = [REPO / "torch" / rel for rel in linked_paths()]
    files = [p for source in sources for p in (sorted(source.rglob("*.py")) if source.is_dir() else [source])]
    files += sorted((REPO / "test" / "distributed").glob("test_protocol_version*.py"))
    return [
        str(path.relative_to(REPO))
        for path in files
        if not any(fnmatch.fnmatch(path.name, pattern) for pattern in FORK_ONLY_FILES)
    ]


def exported_pages() -> dict[str, str]:
    """``DOC_PAGE`` and every page its exported text links with {doc}, transitively:
    each page's exported text."""
    pages: dict[str, str] = {}
    todo = [DOC_PAGE]
    while todo:
        page = todo.pop(0)
        if page in pages:
            continue
        if not (REPO / page).is_file():
            raise PatchError(f"cannot export {page}: it is missing from {REPO}")
        pages[page] = exported_page_text(page)
        for target in re.findall(r"\{doc\}`(?:[^`<]*<)?([^`>]+)>?`", pages[page]):
            todo.append(f"docs/source/{target}.md")
    return pages


def _fork_only_words() -> re.Pattern[str]:
    """What a PyTorch tree has no use for: this repo's make targets, its tools, its venvs."""
    phony = re.search(r"^\.PHONY:(.*)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    targets = phony.group(1).split() if phony else []
    words = [rf"\bmake {re.escape(target)}\b" for target in targets]
    words += [rf"tools/{re.escape(tool.name)}" for tool in (REPO / "tools").glob("*.py")]
    return re.compile("|".join([*words, r"\.venv"]))


def exported_page_text(page: str) -> str:
    """The page without its fork-only blocks; refused if fork-only words remain."""
    kept, skipping = [], False
    for line in (REPO / page).read_text().splitlines(keepends=True):
        if line.strip() in (FORK_ONLY_BEGIN, FORK_ONLY_END):
            skipping = line.strip() == FORK_ONLY_BEGIN
            continue
        if not skipping:
            kept.append(line)
    text = re.sub(r"\n{3,}", "\n\n", "".join(kept))
    fork_only = _fork_only_words()
    for number, line in enumerate(text.splitlines(), 1):
        if fork_only.search(line):
            raise PatchError(
                f"refusing to export {page}: line {number} of the exported text names this "
                f"fork's make targets or tools ({line.strip()[:60]!r}); put it between "
                f"{FORK_ONLY_BEGIN} and {FORK_ONLY_END}"
            )
    return text


def toctree_entry(pages: list[str]) -> str:
    """A hidden toctree listing the exported pages, appended to ``TOCTREE_PAGE``."""
    names = "\n".join(Path(page).stem for page in pages)
    return f"\n```{{toctree}}\n:hidden:\n\n{names}\n```\n"


def export(checkout: Path) -> list[str]:
    """Apply the change in-tree to a PyTorch source checkout, to propose it upstream.

    Copies real files (no links into this repo), inserts the hook with
    ``patch_source``, exports the pages without their fork-only blocks and lists
    them in a toctree. Everything is read and checked before anything is written,
    so a refusal changes nothing; a second run reports every file "unchanged".
    Returns one line per file.
    """
    missing = [marker for marker in CHECKOUT_MARKERS if not (checkout / marker).exists()]
    if missing:
        raise PatchError(
            f"refusing to export: {checkout} does not look like a PyTorch source "
            f"checkout (it has no {', '.join(missing)})"
        )
    target = c10d_path(checkout / "torch")
    # Bytes, not text mode: the checkout's line endings stay as they are.
    planned = {target: patch_source(target.read_bytes().decode(), str(target)).encode()}
    for name in exported_code():
        planned[checkout / name] = (REPO / name).read_bytes()
    pages = exported_pages()
    for page, text in pages.items():
        planned[checkout / page] = text.encode()
    toctree = checkout / TOCTREE_PAGE
    listing, entry = toctree.read_text(), toctree_entry(list(pages))
    planned[toctree] = (listing if entry in listing else listing + entry).encode()
    return [_write_if_changed(path, data, checkout) for path, data in planned.items()]


def _write_if_changed(path: Path, data: bytes, root: Path) -> str:
    name = path.relative_to(root)
    # A link on the way (`install --torch-dir` ran on the checkout) becomes real
    # files: writing through it would write into this repo.
    links = [root / part for part in (name, *name.parents) if (root / part).is_symlink()]
    if not links and path.is_file() and path.read_bytes() == data:
        return f"unchanged {name}"
    state = "updated" if links or path.exists() else "created"
    for link in links:
        link.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return f"{state} {name}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["install", "revert", "status", "diff", "export"])
    parser.add_argument("--torch-dir", type=Path, help="a torch package directory")
    parser.add_argument("--checkout", type=Path, help="export: a PyTorch source checkout")
    args = parser.parse_args(argv)
    if args.command == "export" and args.checkout is None:
        parser.error("export needs --checkout DIR")
    try:
        if args.command == "export":
            print("\n".join(export(args.checkout)))
            return 0
        torch_dir = args.torch_dir or find_torch_dir()
        if args.command == "status":
            installed, report = status(torch_dir)
            print(report)
            return 0 if installed else 1
        if args.command == "diff":
            sys.stdout.write(diff(torch_dir))
            return 0
        print(install(torch_dir) if args.command == "install" else revert(torch_dir))
        return 0
    except (PatchError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
