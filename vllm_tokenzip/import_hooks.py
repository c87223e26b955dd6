"""Apply a patch to a vLLM module where it is, or right after it is first imported.

The plugin's two patches of vLLM internals (``models.mm_pruning``: the model runners;
``stats``: the chat renderer) use this, so a process that never imports the patched module
(e.g. the API server never imports the runners) pays nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from types import ModuleType

Patch = Callable[[ModuleType], None]
_pending: dict[str, Patch] = {}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs ``_pending[name]`` right after module ``name`` is executed."""

    def find_spec(self, fullname, path, target=None):
        patch = _pending.get(fullname)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def patch_module(name: str, patch: Patch) -> None:
    """Apply ``patch`` to module ``name`` now if imported, else when it is first imported.

    ``patch`` must be idempotent: it may run again if the module is imported anew.
    """
    _pending[name] = patch
    if name in sys.modules:
        patch(sys.modules[name])
    if not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
