"""Take the guardrail out of torch in memory, for the mutation tests.

The mutation tests show that the mismatch tests fail without the guardrail. They
must not touch the shared .venv that others run tests against, so nothing on
disk changes: a meta path finder serves a mutated source for one torch module,
and it is installed by a ``sitecustomize.py`` that :func:`sitecustomize_pythonpath`
writes into a temp dir. Every interpreter started with that ``PYTHONPATH`` (the
spawned ranks included) installs the finder before anything imports torch.

Mutations, by name:

* ``unhook``: ``torch.distributed.distributed_c10d`` as stock, i.e. its hook's
  ``unpatch()`` of the installed, patched file: a node without the fork.
* ``unhook_rpc``: ``torch.distributed.rpc`` (its ``__init__``) as stock: RPC
  without the fork.
* ``unhook_agent``: torchrun's agent (``elastic/agent/server/api.py``) as stock.
* ``noop``: ``torch.distributed._protocol_version`` with ``_check_protocol_version``
  redefined to do nothing: the hook still calls it, and nothing is checked.
* ``blind``: ``torch.distributed._protocol_version._store`` with ``watching``
  redefined to start no watcher: the exchange runs as before, but a rank without
  the check (seen only through its backend's trace) is never noticed.

A mutated module carries ``MARKER`` (the mutation's name) so a rank can report
which code it really ran. Only the standard library and the hook tool are
imported here: this runs at interpreter start-up.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from collections.abc import Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from protocol_version_hook import is_patched, unpatch


MARKER = "__protocol_version_mutation__"

_NOOP_CHECK = '''

def _check_protocol_version(*args: object) -> None:
    """Mutation ``noop``: the guardrail checks nothing."""
'''


_BLIND_WATCHER = '''

import contextlib as _mutation_contextlib


@_mutation_contextlib.contextmanager
def watching(store, after, look):  # type: ignore[no-redef]
    """Mutation ``blind``: no watcher, whatever the trace shows."""
    yield
'''


def _unhook(target: str) -> Callable[[str], str]:
    def unhook(source: str) -> str:
        if not is_patched(source):
            raise RuntimeError(f"{target} has no hook to take out: run `make` first")
        return unpatch(target, source, target)

    return unhook


def _noop(source: str) -> str:
    return source + _NOOP_CHECK


def _blind(source: str) -> str:
    if "def watching(" not in source:
        raise RuntimeError("_store has no watching() to take out: the package layout changed")
    return source + _BLIND_WATCHER


MUTATIONS: dict[str, tuple[str, Callable[[str], str]]] = {
    "unhook": ("torch.distributed.distributed_c10d", _unhook("distributed/distributed_c10d.py")),
    "unhook_rpc": ("torch.distributed.rpc", _unhook("distributed/rpc/__init__.py")),
    "unhook_agent": ("torch.distributed.elastic.agent.server.api", _unhook("distributed/elastic/agent/server/api.py")),
    "noop": ("torch.distributed._protocol_version", _noop),
    "blind": ("torch.distributed._protocol_version._store", _blind),
}


class _MutatedSourceLoader(importlib.abc.SourceLoader):
    """Compiles the mutated text of the installed file.

    A plain ``SourceLoader`` has no ``path_stats``, so it neither reads nor writes
    bytecode: the installed file's cached ``.pyc`` (the unmutated code) cannot be
    picked up instead, and the mutation never lands in ``__pycache__``.
    """

    def __init__(self, path: str, mutation: str) -> None:
        self._path = path
        self._mutation = mutation

    def get_filename(self, fullname: str) -> str:
        return self._path

    def get_data(self, path: str) -> bytes:
        _, mutate = MUTATIONS[self._mutation]
        return mutate(Path(path).read_text()).encode()

    def exec_module(self, module: ModuleType) -> None:
        setattr(module, MARKER, self._mutation)
        super().exec_module(module)


class _MutationFinder(importlib.abc.MetaPathFinder):
    def __init__(self, mutation: str) -> None:
        self._mutation = mutation
        self._fullname, _ = MUTATIONS[mutation]

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self._fullname:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.origin is None:
            return None
        loader = _MutatedSourceLoader(spec.origin, self._mutation)
        return importlib.util.spec_from_file_location(
            fullname, spec.origin, loader=loader,
            submodule_search_locations=spec.submodule_search_locations,  # a package stays one
        )


def install(mutation: str) -> None:
    """Serve ``mutation`` from now on in this interpreter (before torch is imported)."""
    sys.meta_path.insert(0, _MutationFinder(mutation))


def sitecustomize_pythonpath(directory: Path, mutation: str) -> str:
    """Write a ``sitecustomize.py`` installing ``mutation`` into ``directory``.

    Returns the ``PYTHONPATH`` under which new interpreters pick it up.
    """
    if mutation not in MUTATIONS:
        raise ValueError(f"unknown mutation {mutation!r}; known: {', '.join(MUTATIONS)}")
    (directory / "sitecustomize.py").write_text(
        f"import protocol_version_mutation\nprotocol_version_mutation.install({mutation!r})\n"
    )
    return os.pathsep.join([str(directory), str(Path(__file__).resolve().parent)])
