"""The vLLM entry point: declared, idempotent, version-checked, registers the adapters."""

from __future__ import annotations

import importlib.metadata

import pytest

from vllm_tokenzip import plugin
from vllm_tokenzip.models import ADAPTERS


def test_entry_point_is_declared():
    points = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert {p.name: p.value for p in points}["tokenzip"] == "vllm_tokenzip.plugin:register"


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.33.1", "0.33.0rc1"])
def test_supported_versions_pass(version):
    plugin.check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.31.9", "0.34.0", "1.0.0", "dev"])
def test_unsupported_versions_fail_clearly(version):
    with pytest.raises(plugin.UnsupportedVLLMVersion, match=r">=0\.32,<0\.34"):
        plugin.check_vllm_version(version)


def test_register_is_idempotent_and_maps_every_architecture():
    from vllm import ModelRegistry

    plugin.register()
    plugin.register()
    for architecture, adapter in ADAPTERS.items():
        module, _, cls = adapter.partition(":")
        registered = ModelRegistry.models[architecture]
        assert (registered.module_name, registered.class_name) == (module, cls)


def test_register_refuses_unsupported_vllm(monkeypatch):
    import vllm

    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setattr(vllm, "__version__", "0.31.0")
    with pytest.raises(plugin.UnsupportedVLLMVersion, match=r"installed vLLM is 0\.31\.0"):
        plugin.register()


def test_every_package_is_listed_for_wheels():
    """pyproject lists packages explicitly (server/ installs as tokenzip_server)."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    listed = set(
        tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(root).parts)
        for p in root.glob("vllm_tokenzip/**/__init__.py")
    }
    found |= {"tokenzip_server." + ".".join(p.parent.relative_to(root / "server").parts)
              for p in (root / "server").glob("*/**/__init__.py")}  # fmt: skip
    assert found - listed == set()


def test_short_videos_are_refused_before_vllm_divides_by_zero():
    """Qwen2VLVideoProcessor maps to the checked backend: same frames, or ValueError (400)."""
    from vllm.multimodal.video import (
        VIDEO_LOADER_REGISTRY,
        Qwen2VLVideoBackend,
        VideoSourceMetadata,
        VideoTargetMetadata,
    )

    from vllm_tokenzip import video_loader

    video_loader.install()
    video_loader.install()
    name = VIDEO_LOADER_REGISTRY.get_backend_for_video_processor("Qwen2VLVideoProcessor")
    assert name == video_loader.BACKEND_NAME
    checked = VIDEO_LOADER_REGISTRY.load(name)
    target = VideoTargetMetadata(num_frames=-1, fps=2, max_duration=300)
    for frames, fps in ((2, 1.0), (3, 30.0), (61, 29.97), (400, 60.0)):
        source = VideoSourceMetadata(frames, fps, frames / fps)
        assert checked.compute_frames_index_to_sample(source, target) == (
            Qwen2VLVideoBackend.compute_frames_index_to_sample(source, target)
        )
    with pytest.raises(ZeroDivisionError):  # what vLLM 0.32 does, which the check prevents
        Qwen2VLVideoBackend.compute_frames_index_to_sample(VideoSourceMetadata(1, 1.0, 1.0), target)
    with pytest.raises(ValueError, match=r"has 1 frame.*at least 2"):
        checked.compute_frames_index_to_sample(VideoSourceMetadata(1, 1.0, 1.0), target)
