# megatron-dapo GPU image (first version; the operations issue adds the fleet role, the
# non-root user's entrypoint and hadolint in the test suite).
#
# NVIDIA's PyTorch container ships CUDA, NCCL, Transformer Engine and apex built against its own
# torch, so torch/torchvision are taken from the base image; every other dependency is installed
# at the exact version in requirements/pins.txt, the same file the CPU set-up (Makefile) uses.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/megatron-dapo

COPY requirements/ requirements/
# The base image's torch stays: drop the torch pins from the constraints, keep all others.
RUN grep -vE '^(torch|torchvision)==' requirements/pins.txt > /tmp/pins-gpu.txt \
    && pip install --no-cache-dir -c /tmp/pins-gpu.txt -r requirements/core.txt

COPY pyproject.toml README.md ./
COPY pipeline/ pipeline/
COPY megatron_dapo/ megatron_dapo/
COPY launch/ launch/
COPY configs/ configs/
RUN pip install --no-cache-dir --no-deps . \
    && useradd --create-home --uid 1000 dapo
USER 1000
ENTRYPOINT ["megatron-dapo"]
CMD ["--help"]
