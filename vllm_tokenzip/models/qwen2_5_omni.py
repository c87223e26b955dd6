"""Qwen2.5-Omni thinker: everything the plugin changes about this model family.

- Audio resampling with PyAV: vLLM's default resampler is torchaudio, which is a CUDA build on
  PyPI and cannot load beside CPU torch (requests with 48 kHz audio, or a video whose audio
  track is 48 kHz, failed with HTTP 500). PyAV is a vLLM audio dependency on every platform
  and gives the same 16 kHz input to the Whisper feature extractor, so it is used everywhere.
"""

from __future__ import annotations

from vllm.model_executor.models.qwen2_5_omni_thinker import (
    Qwen2_5OmniThinkerDummyInputsBuilder,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2_5OmniThinkerMultiModalProcessor,
    Qwen2_5OmniThinkerProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.audio import AudioResampler

AUDIO_RESAMPLE_METHOD = "pyav"


class TokenZipQwen2_5OmniProcessingInfo(Qwen2_5OmniThinkerProcessingInfo):
    def get_data_parser(self):
        parser = super().get_data_parser()
        parser.audio_resampler = AudioResampler(
            target_sr=parser.audio_resampler.target_sr, method=AUDIO_RESAMPLE_METHOD
        )
        return parser


@MULTIMODAL_REGISTRY.register_processor(
    Qwen2_5OmniThinkerMultiModalProcessor,
    info=TokenZipQwen2_5OmniProcessingInfo,
    dummy_inputs=Qwen2_5OmniThinkerDummyInputsBuilder,
)
class TokenZipQwen2_5OmniThinker(Qwen2_5OmniThinkerForConditionalGeneration):
    """The stock thinker with the plugin's processing info."""
