# syntax=docker/dockerfile:1
# Stage-worker image: CUDA 13 + PyTorch + Megatron-core + Transformer Engine + vLLM + mergekit and
# this project's `stages` package. It runs `python -m stages.worker SPEC.json`, under torchrun for
# training (flows/launchers.py builds the Slurm and Kubernetes commands that use it).
# No orchestrator stack (Prefect, Hydra, MLflow) in here: vLLM pins fastapi<0.137 and Prefect 3.9
# needs fastapi>=0.139 (docs/platform-notes.md). The orchestrator's image is Dockerfile.orchestrator.
#
#   docker build -t granite-forge-worker:0.1.0 .
#
# devel, not runtime: Transformer Engine's PyTorch extension is compiled here with nvcc, and
# Triton, TE and vLLM compile kernels at run time.
FROM nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04

# torch as vLLM pins it (and as CI tests it: constraints.txt); megatron-core as CI tests it
ARG TORCH_VERSION=2.13.0
ARG VLLM_VERSION=0.32.0
ARG TE_VERSION=2.20.2
ARG MEGATRON_CORE_VERSION=0.16.1
# GPU architectures TE compiles for (H100/H200 = 90, B200 = 100); each one adds build time
ARG NVTE_CUDA_ARCHS="90;100"

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    CUDA_HOME=/usr/local/cuda

# Ubuntu 24.04's Python is 3.12 (megatron-core >= 0.17 needs it); -dev for the TE extension build
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev python3-venv git \
        bubblewrap \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first, then TE built against it without build isolation (an isolated build would compile
# against whatever torch is newest on PyPI and break at import)
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" "setuptools==80.9.0" "wheel==0.45.1" \
        "pybind11==3.0.1" "ninja==1.13.0" \
    && NVTE_CUDA_ARCHS="${NVTE_CUDA_ARCHS}" pip install --no-cache-dir --no-build-isolation \
        "transformer-engine[core-cu13,pytorch]==${TE_VERSION}"

WORKDIR /opt/granite-forge
COPY pyproject.toml README.md ./
COPY stages ./stages
COPY flows ./flows
# installed as forge_kernels (pyproject: a top-level `kernels` would shadow Hugging Face's)
COPY kernels ./kernels
# lm-evaluation-harness task files read by `evaluate` stages (not part of the installed package)
COPY conf/lm_eval ./conf/lm_eval
ENV FORGE_LM_EVAL_TASKS=/opt/granite-forge/conf/lm_eval
# the worker, GPU and vLLM extras; `pip check` fails the build on any conflict
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" "vllm==${VLLM_VERSION}" \
        "megatron-core==${MEGATRON_CORE_VERSION}" "./[worker,gpu,vllm]" \
    && pip check \
    && python -c "import megatron.core, mergekit, stages.worker"

# numeric, so Kubernetes' runAsNonRoot can verify it (Pyxis/enroot run as the submitting user)
RUN useradd --create-home --uid 10001 --user-group forge
USER 10001
WORKDIR /home/forge

# One single-process worker: `docker run IMAGE /store/<stage>-<key>/spec.json`. Training runs
# override it with `python -m torch.distributed.run ... -m stages.worker SPEC` (the launchers do).
ENTRYPOINT ["python", "-m", "stages.worker"]
