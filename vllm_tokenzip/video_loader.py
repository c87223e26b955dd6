"""Qwen2-VL video loading that refuses clips too short to sample (vLLM 0.32-0.33).

vLLM's ``qwen2_vl`` video backend (``vllm.multimodal.video.Qwen2VLVideoBackend``, used for
``Qwen2VLVideoProcessor``: Qwen2.5-VL and Qwen2.5-Omni) samples a multiple of
``temporal_patch_size`` (2) frames; a clip with fewer frames (a one-frame video) makes it
divide by zero, and the request gets HTTP 500. :func:`install` registers, through vLLM's own
``VIDEO_LOADER_REGISTRY``, a subclass for the same processor that raises ``ValueError`` (HTTP
400, which names the frame count and the minimum) instead, and changes nothing else.
"""

from __future__ import annotations

from types import ModuleType

from vllm_tokenzip.import_hooks import patch_module

PATCHED_MODULE = "vllm.multimodal.video"
BACKEND_NAME = "tokenzip_qwen2_vl"
VIDEO_PROCESSOR = "Qwen2VLVideoProcessor"


def check_frame_count(total_frames: int, temporal_patch_size: int) -> None:
    """Raise ValueError when a clip has fewer frames than one temporal patch."""
    if total_frames < temporal_patch_size:
        raise ValueError(
            f"video_url: the video has {total_frames} frame(s); this model samples frames in "
            f"groups of {temporal_patch_size}, so it needs at least {temporal_patch_size}"
        )


def _register(module: ModuleType) -> None:
    base = module.Qwen2VLVideoBackend
    registry = module.VIDEO_LOADER_REGISTRY
    if registry.get_backend_for_video_processor(VIDEO_PROCESSOR) == BACKEND_NAME:
        return

    class CheckedQwen2VLVideoBackend(base):
        """vLLM's Qwen2-VL backend; clips shorter than a temporal patch are refused."""

        @classmethod
        def compute_frames_index_to_sample(cls, source, target, **kwargs) -> list[int]:
            check_frame_count(source.total_frames_num, kwargs.get("temporal_patch_size", 2))
            return super().compute_frames_index_to_sample(source, target, **kwargs)

    registry.register(BACKEND_NAME, video_processor=VIDEO_PROCESSOR)(CheckedQwen2VLVideoBackend)


def install() -> None:
    """Register the checked backend when vLLM's video module is (or has been) imported."""
    patch_module(PATCHED_MODULE, _register)
