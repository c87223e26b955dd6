"""vLLM general-plugin entry point (``vllm.general_plugins``: ``tokenzip``).

vLLM calls :func:`register` in every process it starts (API server, engine core, workers),
possibly several times per process. It is idempotent, cheap (model classes are registered
as lazy ``"module:Class"`` strings) and needs no CUDA.
"""

from __future__ import annotations

import logging
import multiprocessing
import os

from vllm_tokenzip import __version__
from vllm_tokenzip.models import ADAPTERS

SUPPORTED_VLLM = ((0, 32), (0, 34))  # [lower, upper) on (major, minor)
# A child of the "vllm" logger, so the line gets vLLM's handler and process prefix.
logger = logging.getLogger("vllm.tokenzip")
_registered = False


class UnsupportedVLLMVersion(RuntimeError):
    pass


def check_vllm_version(version: str) -> None:
    """Raise :class:`UnsupportedVLLMVersion` unless ``version`` is in the supported range."""
    try:
        major_minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        raise UnsupportedVLLMVersion(f"cannot parse vLLM version {version!r}") from None
    low, high = SUPPORTED_VLLM
    if not low <= major_minor < high:
        raise UnsupportedVLLMVersion(
            f"vllm_tokenzip {__version__} supports vLLM >={low[0]}.{low[1]},<{high[0]}.{high[1]}"
            f"; installed vLLM is {version}. Install a supported vLLM or uninstall vllm-tokenzip."
        )


def register() -> None:
    """Register the model adapters with vLLM (once per process)."""
    global _registered
    if _registered:
        return
    import vllm
    from vllm import ModelRegistry

    check_vllm_version(vllm.__version__)
    for architecture, adapter in ADAPTERS.items():
        ModelRegistry.register_model(architecture, adapter)
    _registered = True
    logger.info(
        "vllm_tokenzip %s registered adapters for %s (process %s, pid %d)",
        __version__,
        ", ".join(ADAPTERS),
        multiprocessing.current_process().name,
        os.getpid(),
    )
