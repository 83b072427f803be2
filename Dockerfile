# megatron-dapo GPU images: two targets of this file, one container per role
# (launch/container_entrypoint.sh; `docker run` lines in launch/README.md):
#   docker build --target fleet -t megatron-dapo:fleet .
#       fleet [server flag ...]    one SGLang server (DAPO_SGLANG_MODEL)
#       router WORKER_URL ...      sglang-router in front of the servers
#   docker build --target trainer -t megatron-dapo:trainer .
#       trainer [key=value ...]    this node's trainer ranks (launch/torchrun.sh, DAPO_CONFIG); also
#                                  the fleet's roles, an embedded fleet and launch/gpu_smoke.sh
#
# Why not NVIDIA's PyTorch container: its torch is NVIDIA's own build, not the 2.14.1 that
# SGLang 0.5.23 pins, and its Python is 3.12, not the project's 3.11; its Transformer Engine and
# apex are built for a torch that SGLang's dependencies would replace. Both images instead share
# one stack: the CUDA 13.0 development image (nvcc and cuDNN headers for the kernels compiled
# here, Transformer Engine's extension, and at run time, FlashInfer's JIT), Python 3.11, and
# PyPI's torch 2.14.1, the CUDA 13.0 build, with the CUDA libraries, NCCL included, it declares.
# Every version comes from requirements/pins.txt (the CPU lock) overridden by
# requirements/gpu-pins.txt (what only the GPU images install, and the few pins SGLang's GPU
# dependencies need otherwise), merged by requirements/gpu_pins.py:
#   fleet    SGLang with its declared dependencies (sglang-kernel, flashinfer-python,
#            torch_memory_saver) and sglang-router (requirements/fleet-gpu.txt)
#   trainer  the fleet's stack plus Transformer Engine compiled against that torch
#            (requirements/trainer-gpu.txt; no apex, see gpu-pins.txt)
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04

FROM ${CUDA_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Python 3.11 from the deadsnakes archive (Ubuntu 24.04 ships 3.12). libibverbs and its
# providers are the user-space InfiniBand stack NCCL's IB transport loads (with
# `--device=/dev/infiniband`). Their versions follow the base image's Ubuntu release: the Python
# packages are the pinned ones.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get install -y --no-install-recommends \
        python3.11 python3.11-dev python3.11-venv libibverbs1 ibverbs-providers \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    DAPO_ROOT=/opt/megatron-dapo \
    DAPO_PYTHON=python
WORKDIR /opt/megatron-dapo
COPY requirements/ requirements/
# The run user (a UID above the base image's own users) owns /workspace, where runs write their
# checkpoints, weights and logs (mount a volume there).
RUN python requirements/gpu_pins.py constraints > /opt/constraints.txt \
    && pip install --no-cache-dir -c /opt/constraints.txt -r requirements/gpu-build.txt \
    && pip install --no-cache-dir -c /opt/constraints.txt \
        -r requirements/core.txt -r requirements/fleet-gpu.txt \
    && useradd --create-home --uid 10001 --user-group dapo \
    && install -d -o 10001 -g 10001 /workspace
ENTRYPOINT ["/opt/megatron-dapo/launch/container_entrypoint.sh"]
CMD ["help"]

# The project itself, copied into each image last, so a change of code rebuilds no dependency.
FROM scratch AS source
COPY pyproject.toml README.md /opt/megatron-dapo/
COPY pipeline/ /opt/megatron-dapo/pipeline/
COPY megatron_dapo/ /opt/megatron-dapo/megatron_dapo/
COPY launch/ /opt/megatron-dapo/launch/
COPY configs/ /opt/megatron-dapo/configs/

FROM base AS fleet
COPY --from=source /opt/megatron-dapo/ /opt/megatron-dapo/
RUN pip install --no-cache-dir --no-deps .
USER 10001
WORKDIR /workspace

FROM base AS trainer
# Transformer Engine's PyTorch extension compiles here for the pinned torch (build arguments
# reach it as environment): NVTE_CUDA_ARCHS limits it to the cluster's GPUs (A100, H100, B200 by
# default; each one adds build time), MAX_JOBS to the build host's memory (several GB a job).
ARG NVTE_CUDA_ARCHS="80;90;100"
ARG MAX_JOBS=8
RUN pip install --no-cache-dir --no-build-isolation -c /opt/constraints.txt \
        -r requirements/trainer-gpu.txt
COPY --from=source /opt/megatron-dapo/ /opt/megatron-dapo/
RUN pip install --no-cache-dir --no-deps .
USER 10001
WORKDIR /workspace
