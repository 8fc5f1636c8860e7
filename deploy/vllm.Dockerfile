# kvgate worker image with vLLM, for GPU hosts (deploy/compose.gpu.yaml). Built on vLLM's own
# CUDA image so torch, CUDA and vLLM match; kvgate comes from the same wheelhouse as the app
# image (`make wheelhouse`). Needs a registry for the base image.
#   docker build -f deploy/vllm.Dockerfile -t kvgate/app-vllm:local deploy/.build/wheelhouse
ARG VLLM_IMAGE=vllm/vllm-openai:v0.33.0
FROM ${VLLM_IMAGE}

COPY . /wheels/
RUN pip install --no-cache-dir --no-index --find-links /wheels kvgate \
    && rm -rf /wheels \
    && python3 -c "import kvgate.cli, gpu_worker.vllm_engine, vllm"

EXPOSE 50061 9100
ENTRYPOINT ["kvgate"]
CMD ["--help"]
