"""vllm-tokenzip: a vLLM plugin that prunes audio/video tokens before prefill."""

__version__ = "0.1.0"
