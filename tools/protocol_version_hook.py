#!/usr/bin/env python3
"""Insert the protocol version guardrail into an installed torch, or take it out.

The fork ships no copy of PyTorch's source. Instead this tool edits the installed
torch in place: each row of ``HOOKS`` adds a few marked lines at one place that
call our package (in ``_new_process_group_helper`` right before each kind of
backend is constructed, after stock has validated the arguments; in
``SimpleElasticAgent._rendezvous`` right after torchrun's rendezvous; in ``init_rpc``
right before the RPC backend is built), and it links the files of ``LINKED``
(the package, and the helpers that the tests, the demo and the benchmarks share)
from this repo into the installed torch, so edits to the repo take effect
without a reinstall.
Everything it inserts sits between two marker comments, which is how ``revert``
and ``diff`` find it again.

    python tools/protocol_version_hook.py install   # idempotent
    python tools/protocol_version_hook.py status    # exit 0 when installed
    python tools/protocol_version_hook.py diff      # the change, as a unified diff
    python tools/protocol_version_hook.py revert    # back to stock
    python tools/protocol_version_hook.py export --checkout DIR  # into a PyTorch source tree

``--torch-dir DIR`` points at a ``torch`` package directory instead of the one
this interpreter imports. The wheel tool reuses the edit by importing
``apply_hooks``. The tool refuses, without changing anything, a torch whose
hooked functions do not have the shape it knows, and a marked block that was
edited by hand. Errors are one line on stderr
and exit code 2.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import fnmatch
import functools
import io
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn


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


class PatchError(RuntimeError):
    """The target is not something this tool knows how to change; nothing was changed."""


def _lines(source: str) -> list[str]:
    """``source``'s lines as Python numbers them (``str.splitlines`` also splits on form feeds and the like)."""
    return io.StringIO(source, newline="").readlines()


@functools.lru_cache(maxsize=16)
def _function_lines(source: str, function: str, origin: str) -> range:
    """The lines (0-based) of ``function`` ("name", or "Class.method") in ``source``, wherever it is defined
    (``init_rpc`` is, under ``if is_available():``); empty when it has none."""
    try:
        node: ast.AST = ast.parse(source)
    except SyntaxError as e:
        raise PatchError(f"refusing to patch {origin}: it does not parse ({e.msg}, line {e.lineno})") from None
    defs = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for name in function.split("."):
        found = [n for n in ast.walk(node) if isinstance(n, defs) and n.name == name]
        if not found:
            return range(0)
        node = found[0]
    return range(node.lineno - 1, node.end_lineno or node.lineno)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Hook:
    """One call into the package, inserted at one known place of the installed torch.

    The block goes right before the statement ``at`` (its first line, stripped) and the
    comments right above it, in ``function`` of ``target``: it is found by code, so that
    upstream's edits to comments do not move it. ``at`` must occur exactly once in that
    function; anything else is a torch this tool does not know, and it is refused.
    """

    target: str  # relative to a torch package directory
    function: str  # the function the hook goes into: "name" or "Class.method"
    place: str  # where in it, for the refusal message
    at: str
    body: tuple[str, ...]
    releases: tuple[str, ...] = ("2.13", "2.14")  # the releases of RELEASES that have this place

    def block(self, indent: str, newline: str = "\n") -> str:
        lines = [BEGIN, *self.body, END]
        return "".join(f"{indent}{line}{newline}" if line else newline for line in lines) + newline

    def where(self, source: str, origin: str) -> tuple[int, str, str]:
        """The offset in ``source`` where the block goes, its indent, and the line ending there."""
        lines, body = _lines(source), _function_lines(source, self.function, origin)
        hits = [i for i in body if lines[i].strip() == self.at]
        if len(hits) != 1:
            raise PatchError(
                f"refusing to patch {origin}: expected exactly one place in {self.function} {self.place} "
                f"(the statement {self.at!r}), found {len(hits)}. This tool knows torch {' and '.join(RELEASES)}; "
                "port the row of the hook table in tools/protocol_version_hook.py to this torch first."
            )
        first = hits[0]
        indent = lines[first][: len(lines[first]) - len(lines[first].lstrip())]
        newline = lines[first][len(lines[first].rstrip("\r\n")):] or "\n"
        while first - 1 in body and lines[first - 1].startswith(indent + "#"):
            first -= 1
        return sum(map(len, lines[:first])), indent, newline

    def is_placed(self, source: str, origin: str) -> bool:
        """Whether the block is already in place in ``source``: patching it changes nothing."""
        return self.patch(source, origin) == source

    def patch(self, source: str, origin: str) -> str:
        """Return ``source`` with the hook inserted; unchanged if already there."""
        at, indent, newline = self.where(source, origin)
        block = self.block(indent, newline)
        return source if source[max(at - len(block), 0):at] == block else source[:at] + block + source[at:]


# The call every backend row of _new_process_group_helper makes, with the names
# that function has in scope there.
_C10D_CALL = (
    "from torch.distributed._protocol_version import _check_protocol_version",
    "",
    "_check_protocol_version(",
    "    store, prefix_store, group_rank, group_size, timeout, backend_str, device, group_name, is_default_group",
    ")",
)
C10D_TARGET, C10D_FUNCTION = "distributed/distributed_c10d.py", "_new_process_group_helper"
# The torch releases this tool knows, each told by a statement of _new_process_group_helper that only it has:
# 2.13 constructs the built-in backends there; 2.14 registers them as plugins, made in one place.
RELEASES = {
    "2.13": "backend_class = ProcessGroupGloo(",
    "2.14": "Backend._ensure_backend_registered(backend_str)",
}


def _c10d_hook(place: str, at: str, releases: tuple[str, ...] = tuple(RELEASES)) -> Hook:
    """A row of _new_process_group_helper: the backend loop has validated this
    backend (and stock every argument before the loop); it is constructed next."""
    return Hook(C10D_TARGET, C10D_FUNCTION, place, at, _C10D_CALL, releases)


HOOKS = (
    _c10d_hook("before a TorchComms backend is made", "comm = new_comm("),
    _c10d_hook("before ProcessGroupGloo is constructed", "backend_class = ProcessGroupGloo(", ("2.13",)),
    _c10d_hook("before ProcessGroupNCCL is constructed", "backend_class = ProcessGroupNCCL(", ("2.13",)),
    _c10d_hook("before ProcessGroupUCC is constructed", "backend_class = ProcessGroupUCC(", ("2.13",)),
    _c10d_hook("before ProcessGroupXCCL is constructed", "backend_class = ProcessGroupXCCL(", ("2.13",)),
    # From 2.14 on, the built-in backends are made here too.
    _c10d_hook("before a registered backend is created", "backend_plugin = Backend._plugins[backend_str.upper()]"),
    # SimpleElasticAgent._rendezvous (torchrun's agents): the round's store and
    # this agent's group rank are known; worker ranks are assigned next, workers
    # started after that.
    Hook(
        target="distributed/elastic/agent/server/api.py",
        function="SimpleElasticAgent._rendezvous",
        place="right after next_rendezvous(), before the worker ranks are assigned",
        at='with self.record_duration("ASSIGN_WORKER_RANKS"):',
        body=(
            "from torch.distributed._protocol_version._agent import check_agent_protocol_version",
            "",
            "check_agent_protocol_version(store, group_rank, group_world_size, spec.rdzv_handler.get_backend(), "
            "spec.args)",
        ),
    ),
    # init_rpc: the store is wrapped in PrefixStore("rpc_prefix_N"); distributed
    # autograd and then the RPC backend (which builds a ProcessGroupGloo on that
    # store) come next.
    Hook(
        target="distributed/rpc/__init__.py",
        function="init_rpc",
        place="right before distributed autograd and the RPC backend are initialised",
        at="dist_autograd._init(rank)",
        body=(
            "from torch.distributed._protocol_version._rpc import check_rpc_protocol_version",
            "",
            "check_rpc_protocol_version(store, name, rank, world_size, rpc_backend_options)",
        ),
    ),
)
TARGETS = tuple(dict.fromkeys(hook.target for hook in HOOKS))
# A marked block, as install writes it, with its indent and line ending.
_BLOCK = re.compile(rf"^([ \t]*){re.escape(BEGIN)}(\r?\n).*?^[ \t]*{re.escape(END)}\r?\n\r?\n",
                    re.MULTILINE | re.DOTALL)


def is_patched(source: str) -> bool:
    return BEGIN in source


def release_of(c10d_source: str, origin: str) -> str:
    """The release whose shape ``_new_process_group_helper`` has; refused when it has none this tool knows."""
    lines, body = _lines(c10d_source), _function_lines(c10d_source, C10D_FUNCTION, origin)
    for release, statement in RELEASES.items():
        if any(lines[i].strip() == statement for i in body):
            return release
    known = "; ".join(f"{release}: {statement!r}" for release, statement in RELEASES.items())
    raise PatchError(
        f"refusing to patch {origin}: its {C10D_FUNCTION} has the shape of no torch release this tool knows "
        f"({known}); port the hook table in tools/protocol_version_hook.py to this torch first."
    )


def hooks_of(sources: dict[str, str], origin: str) -> tuple[Hook, ...]:
    """The rows of ``HOOKS`` for the release that ``sources`` (each target's text) are."""
    release = release_of(sources[C10D_TARGET], origin)
    return tuple(hook for hook in HOOKS if release in hook.releases)


def unpatch(target: str, source: str, origin: str) -> str:
    """Return ``source`` (the text of ``target``) with every hook block removed.

    Only the exact blocks that ``patch`` inserts are removed: a block edited by
    hand is refused rather than left half in place.
    """
    blocks = {hook.block(m[1], m[2]) for m in _BLOCK.finditer(source) for hook in HOOKS if hook.target == target}
    stock = _BLOCK.sub(lambda match: "" if match[0] in blocks else match[0], source)
    if is_patched(stock):
        raise PatchError(
            f"refusing to change {origin}: a marked block differs from the ones this "
            "tool inserts (edited by hand, or by another version of this tool); "
            "reinstall torch (make clean-venv) and install again"
        )
    return stock


def patch_file(target: str, source: str, origin: str, hooks: tuple[Hook, ...]) -> str:
    """Return ``source`` (the text of ``target``) with every hook of ``hooks`` for that file in place."""
    for hook in hooks:
        if hook.target == target:
            source = hook.patch(source, origin)
    return source


def find_torch_dir() -> Path:
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        raise PatchError("torch is not installed in this environment")
    return Path(spec.origin).parent


def module_link(torch_dir: Path) -> Path:
    return torch_dir / PACKAGE


def _read_targets(torch_dir: Path) -> dict[str, tuple[Path, str]]:
    """Each hooked file's path and text; a clear error when ``torch_dir`` is not
    torch. Everything is read before anything is written."""
    targets = {}
    for rel in TARGETS:
        target = torch_dir / rel
        if not target.is_file():
            raise PatchError(f"{torch_dir} is not a torch package directory: it has no {rel}")
        targets[rel] = (target, target.read_text())
    return targets


def apply_hooks(torch_dir: Path) -> list[Path]:
    """Insert every hook into the torch sources under ``torch_dir`` (an installed
    torch, an unpacked wheel, a checkout's ``torch/``); refuse, changing nothing,
    a source this tool does not know. Returns the files it changed."""
    # unpatch first: refuses a block edited by hand, and takes out blocks another place of this tool left
    stock = {rel: (target, unpatch(rel, text, str(target))) for rel, (target, text) in _read_targets(torch_dir).items()}
    hooks = hooks_of({rel: text for rel, (_, text) in stock.items()}, str(torch_dir))
    planned = []
    for rel, (target, source) in stock.items():
        patched = patch_file(rel, source, str(target), hooks)
        if patched != target.read_text():
            planned.append((target, patched))
    for target, patched in planned:
        target.write_text(patched)
    return [target for target, _ in planned]


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


def install(torch_dir: Path) -> str:
    _read_targets(torch_dir)  # not torch: refuse before linking anything
    linked = linked_paths()
    blocked = [str(rel) for rel in linked if _link_state(torch_dir, rel) == "not a link"]
    if blocked:
        raise PatchError(f"refusing to install: {', '.join(blocked)} in {torch_dir} exist and are not links")
    changed = apply_hooks(torch_dir)
    for link in _installed_links(torch_dir):  # links to files since removed go too
        link.unlink()
    for rel in linked:
        (torch_dir / rel).symlink_to(REPO / "torch" / rel, target_is_directory=(REPO / "torch" / rel).is_dir())
    hooks = f"installed the hooks in {', '.join(map(str, changed))}" if changed else "hooks already installed"
    where = f"{len(TARGETS)} files under {torch_dir}"
    return f"{hooks} ({where}); linked {len(linked)} paths to {REPO / 'torch'}"


def revert(torch_dir: Path) -> str:
    """Remove the hooks and the links, then check that none is left."""
    stock = [(target, unpatch(rel, source, str(target))) for rel, (target, source) in _read_targets(torch_dir).items()]
    for target, text in stock:
        target.write_text(text)
    for link in _installed_links(torch_dir):
        link.unlink()
    left = [str(link) for link in _installed_links(torch_dir)]
    patched = [rel for rel, (_, source) in _read_targets(torch_dir).items() if is_patched(source)]
    if patched or left:
        raise PatchError(f"revert did not take in {torch_dir}: hooks in {patched} or links {left} remain")
    return f"reverted {len(TARGETS)} files in {torch_dir} to stock; removed the links"


def _hook_state(hook: Hook, source: str, origin: str) -> str:
    if hook.is_placed(source, origin):
        return "present"
    return "edited" if is_patched(source) else "absent"


def status(torch_dir: Path) -> tuple[bool, str]:
    """Whether every hook of this torch's release (exactly as this tool inserts it) and every link are in
    place, and a one-line report."""
    sources = {rel: text for rel, (_, text) in _read_targets(torch_dir).items()}
    rows = hooks_of(sources, str(torch_dir))
    hooks = [(hook, _hook_state(hook, sources[hook.target], str(torch_dir / hook.target))) for hook in rows]
    states = {rel: _link_state(torch_dir, rel) for rel in linked_paths()}
    wrong = [f"{rel} {state}" for rel, state in states.items() if state != "linked"]
    installed = all(state == "present" for _, state in hooks) and not wrong
    links = ", ".join(wrong) if wrong else f"all {len(states)} links in place"
    counts = {state: sum(1 for _, s in hooks if s == state) for _, state in hooks}
    report = ", ".join(f"{n} {state}" for state, n in counts.items())
    return installed, f"hooks: {report} (of {len(rows)}); {links}"


def diff(torch_dir: Path) -> str:
    """The change every hook makes, as one unified diff."""
    parts = []
    for rel, (target, patched) in _read_targets(torch_dir).items():
        if not is_patched(patched):
            raise PatchError(f"the hooks are not installed in {target}")
        parts += difflib.unified_diff(
            unpatch(rel, patched, str(target)).splitlines(keepends=True),
            patched.splitlines(keepends=True),
            f"a/torch/{rel}",
            f"b/torch/{rel}",
        )
    return "".join(parts)


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
    "test_protocol_version_docs.py",  # builds this repo's docs/source; upstream builds its own
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

    Copies real files (no links into this repo), inserts every hook, exports the pages without their fork-only
    blocks and lists
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
    # Bytes, not text mode: the checkout's line endings stay as they are.
    sources = {rel: (target, target.read_bytes().decode())
               for rel, (target, _) in _read_targets(checkout / "torch").items()}
    hooks = hooks_of({rel: text for rel, (_, text) in sources.items()}, str(checkout))
    planned = {target: patch_file(rel, text, str(target), hooks).encode() for rel, (target, text) in sources.items()}
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


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors are one line too, like every other error of the tool."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _OneLineParser(description=__doc__.splitlines()[0])
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
    except (PatchError, OSError, UnicodeDecodeError) as e:  # a target that is not text: not torch's
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
