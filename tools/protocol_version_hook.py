#!/usr/bin/env python3
"""Insert the protocol version guardrail into an installed torch, or take it out.

The fork ships no copy of PyTorch's source. Instead this tool edits the installed
``torch/distributed/distributed_c10d.py`` in place: it adds a few marked lines to
``init_process_group`` that call our module, right before the default group's
backend is built, and links ``torch/distributed/_protocol_version.py`` of this
repo into the installed package, so edits to the repo take effect without a
reinstall. Everything it inserts sits between two marker comments, which is how
``revert`` and ``diff`` find it again.

    python tools/protocol_version_hook.py install   # idempotent
    python tools/protocol_version_hook.py status    # exit 0 when installed
    python tools/protocol_version_hook.py diff      # the change, as a unified diff
    python tools/protocol_version_hook.py revert    # back to stock
    python tools/protocol_version_hook.py export --checkout DIR  # into a PyTorch source tree

``--torch-dir DIR`` points at a ``torch`` package directory without importing it
(how the wheel and export tools reuse the same edit). The tool refuses, without
changing anything, a ``distributed_c10d.py`` whose ``init_process_group`` does not
have the shape it knows.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import os
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
MODULE_SOURCE = REPO / "torch" / "distributed" / "_protocol_version"
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
    """The target is not a distributed_c10d.py this tool knows how to patch."""


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


def unpatch_source(source: str) -> str:
    """Return ``source`` with the hook block removed (stock text)."""
    if not is_patched(source):
        return source
    return source.replace(hook_block(), "", 1)


def find_torch_dir() -> Path:
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        raise PatchError("torch is not installed in this environment")
    return Path(spec.origin).parent


def c10d_path(torch_dir: Path) -> Path:
    return torch_dir / "distributed" / "distributed_c10d.py"


def module_link(torch_dir: Path) -> Path:
    return torch_dir / "distributed" / "_protocol_version"


def _remove_stale_module_file(torch_dir: Path) -> None:
    """An install made before the module became a package linked a single file."""
    stale = torch_dir / "distributed" / "_protocol_version.py"
    if stale.is_symlink():
        stale.unlink()


def install(torch_dir: Path) -> str:
    target = c10d_path(torch_dir)
    source = target.read_text()
    patched = patch_source(source, str(target))
    link = module_link(torch_dir)
    _remove_stale_module_file(torch_dir)
    if link.is_symlink():
        link.unlink()
    link.symlink_to(MODULE_SOURCE, target_is_directory=True)
    if patched == source:
        return f"already installed in {target}; module linked to {MODULE_SOURCE}"
    target.write_text(patched)
    return f"installed the hook in {target}; module linked to {MODULE_SOURCE}"


def revert(torch_dir: Path) -> str:
    target = c10d_path(torch_dir)
    target.write_text(unpatch_source(target.read_text()))
    link = module_link(torch_dir)
    if link.is_symlink():
        link.unlink()
    return f"reverted {target} to stock"


# What `export` copies into a PyTorch checkout, each to the same path there as here.
EXPORTED_FILES = (
    "torch/distributed/_protocol_version.py",
    "test/distributed/test_protocol_version.py",
    "test/distributed/protocol_version_utils.py",  # the spawn helpers that test imports
    "docs/source/distributed.protocol_version.md",
)
# What a PyTorch source checkout has and an installed torch does not.
CHECKOUT_MARKERS = ("setup.py", "torch/distributed/distributed_c10d.py", "test/distributed", "docs/source")


def export(checkout: Path) -> list[str]:
    """Apply the change in-tree to a PyTorch source checkout, to propose it upstream.

    Copies real files (no links into this repo) and inserts the hook with
    ``patch_source``. Everything is read and checked before anything is written,
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
    for name in EXPORTED_FILES:
        if not (REPO / name).is_file():
            raise PatchError(f"cannot export {name}: it is missing from {REPO}")
        planned[checkout / name] = (REPO / name).read_bytes()
    return [_write_if_changed(path, data, checkout) for path, data in planned.items()]


def _write_if_changed(path: Path, data: bytes, root: Path) -> str:
    name = path.relative_to(root)
    if path.is_file() and not path.is_symlink() and path.read_bytes() == data:
        return f"unchanged {name}"
    state = "updated" if path.exists() or path.is_symlink() else "created"
    if path.is_symlink():  # e.g. `install --torch-dir` ran on the checkout: write a real file
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return f"{state} {name}"


def diff(torch_dir: Path) -> str:
    target = c10d_path(torch_dir)
    patched = target.read_text()
    stock = unpatch_source(patched)
    return "".join(
        difflib.unified_diff(
            stock.splitlines(keepends=True),
            patched.splitlines(keepends=True),
            "a/torch/distributed/distributed_c10d.py",
            "b/torch/distributed/distributed_c10d.py",
        )
    )


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
            patched = is_patched(c10d_path(torch_dir).read_text())
            linked = os.path.exists(module_link(torch_dir))
            print(f"hook {'present' if patched else 'absent'}, module {'linked' if linked else 'missing'}")
            return 0 if patched and linked else 1
        if args.command == "diff":
            sys.stdout.write(diff(torch_dir))
            return 0
        print(install(torch_dir) if args.command == "install" else revert(torch_dir))
        return 0
    except PatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
