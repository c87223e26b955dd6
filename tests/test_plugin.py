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
