"""vLLM model adapters, one module per model family.

The plugin registers them under vLLM's architecture names as lazy ``"module:Class"``
strings, so importing this package never imports vLLM's model code.
"""

from __future__ import annotations

OMNI_ADAPTER = "vllm_tokenzip.models.qwen2_5_omni:TokenZipQwen2_5OmniThinker"
VL_ADAPTER = "vllm_tokenzip.models.qwen2_5_vl:TokenZipQwen2_5_VL"

# vLLM architecture name -> adapter class path.
ADAPTERS: dict[str, str] = {
    "Qwen2_5OmniModel": OMNI_ADAPTER,
    "Qwen2_5OmniForConditionalGeneration": OMNI_ADAPTER,
    "Qwen2_5_VLForConditionalGeneration": VL_ADAPTER,
}
