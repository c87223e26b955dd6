"""vLLM general-plugin entry point (``vllm.general_plugins``: ``tokenzip``).

vLLM calls :func:`register` in every process it starts (API server, engine core, workers),
possibly several times per process. It is idempotent, cheap (model classes are registered
as lazy ``"module:Class"`` strings) and needs no CUDA.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys

from vllm_tokenzip import __version__
from vllm_tokenzip.models import ADAPTERS

SUPPORTED_VLLM = ((0, 32), (0, 34))  # [lower, upper) on (major, minor)
_registered = False


class UnsupportedVLLMVersion(RuntimeError):
    pass


def check_vllm_version(version: str) -> None:
    """Raise :class:`UnsupportedVLLMVersion` unless ``version`` is in the supported range."""
    low, high = SUPPORTED_VLLM
    try:
        major_minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        major_minor = None
    if major_minor is None or not low <= major_minor < high:
        raise UnsupportedVLLMVersion(
            f"vllm_tokenzip {__version__} supports vLLM >={low[0]}.{low[1]},<{high[0]}.{high[1]}"
            f"; installed vLLM is {version}. Install a supported vLLM or uninstall vllm-tokenzip."
        )


def register() -> None:
    """Register the model adapters, the runner patch of ``models.mm_pruning``, the prompt
    statistics hook of ``stats`` and the checked video backend of ``video_loader`` (once per
    process)."""
    global _registered
    if _registered:
        return
    import vllm
    from vllm import ModelRegistry

    from vllm_tokenzip.models.mm_pruning import install_runner_patch
    from vllm_tokenzip.stats import install as install_stats
    from vllm_tokenzip.video_loader import install as install_video_loader

    check_vllm_version(vllm.__version__)
    for architecture, adapter in ADAPTERS.items():
        ModelRegistry.register_model(architecture, adapter)
    install_runner_patch()
    install_stats()  # render_chat wrapper, API servers only
    install_video_loader()
    _registered = True
    _announce(
        f"vllm_tokenzip {__version__} registered adapters for {', '.join(ADAPTERS)} "
        f"(process {multiprocessing.current_process().name}, pid {os.getpid()})"
    )


def _announce(message: str) -> None:
    """One INFO line through vLLM's logger; straight to stderr while vLLM has not configured
    logging yet (the API server loads plugins while it parses its arguments)."""
    if logging.getLogger("vllm").handlers:
        logging.getLogger("vllm.tokenzip").info(message)
    else:
        print(f"INFO vllm_tokenzip: {message}", file=sys.stderr, flush=True)
