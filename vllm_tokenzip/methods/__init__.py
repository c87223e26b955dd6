"""Pure-torch audio/video token compression methods (no vLLM import).

``get(name)`` returns a registered :class:`~vllm_tokenzip.methods.base.Method`;
``available()`` lists the names. Each method module calls :func:`register` at import.
"""

from __future__ import annotations

import importlib

from vllm_tokenzip.methods.base import Method, Need, VideoInputs

_REGISTRY: dict[str, Method] = {}
_METHOD_MODULES = (
    "omnizip",
    "divprune",
    "fastvid",
    "visionzip",
    "evs",
    "vidcom2",
    "dycoke",
    "holitom",
    "prunevid",
    "baselines",
)
_loaded = False


def register(method: Method) -> Method:
    """Add ``method`` to the registry (called by each method module at import)."""
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise ValueError(f"method {method.name!r} registered twice")
    _REGISTRY[method.name] = method
    return method


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for module in _METHOD_MODULES:
        importlib.import_module(f"{__name__}.{module}")
    _loaded = True


def get(name: str) -> Method:
    """The method registered as ``name``; KeyError lists the available names."""
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(available())}") from None


def available() -> list[str]:
    """Sorted names of all registered methods."""
    _load_all()
    return sorted(_REGISTRY)


__all__ = ["Method", "Need", "VideoInputs", "available", "get", "register"]
