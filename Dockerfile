# TokenZip on vLLM's official OpenAI server image (NVIDIA GPUs).
#
#   docker build -t vllm-tokenzip .
#   docker run --gpus all --ipc=host -p 8000:8000 \
#       -v ~/.cache/huggingface:/root/.cache/huggingface vllm-tokenzip \
#       --model Qwen/Qwen2.5-VL-7B-Instruct
#
# Arguments are vllm serve's, as with vllm/vllm-openai; docker/entrypoint.sh adds the plugin's
# middleware and --trust-request-mm-kwargs. The base image's vLLM, torch and Python packages are
# kept: the plugin installs without dependencies (all of them are in the base image), editable
# so that `tokenzip serve --preset` finds configs/ next to the sources.
# VLLM_VERSION must stay in the plugin's supported range (pyproject.toml, extra `gpu`).
ARG VLLM_VERSION=0.32.0
FROM vllm/vllm-openai:v${VLLM_VERSION}

WORKDIR /opt/vllm-tokenzip
COPY pyproject.toml README.md ./
COPY vllm_tokenzip ./vllm_tokenzip
COPY server ./server
COPY configs ./configs
COPY docker/entrypoint.sh /usr/local/bin/tokenzip-entrypoint

RUN uv pip install --system --no-cache --no-deps --editable . \
    && python3 -c "import vllm_tokenzip, tokenzip_server"

WORKDIR /
EXPOSE 8000
ENTRYPOINT ["tokenzip-entrypoint"]
