# megatron-dapo GPU image: one container per role (launch/container_entrypoint.sh):
#   trainer [key=value ...]   this node's trainer ranks (launch/torchrun.sh, DAPO_CONFIG)
#   fleet [server flag ...]   one SGLang server (DAPO_SGLANG_MODEL)
#   router WORKER_URL ...     sglang-router in front of the servers
# `docker run` lines for the roles: launch/README.md.
#
# NVIDIA's PyTorch container ships CUDA, NCCL, Transformer Engine and apex built against its own
# torch, so torch, torchvision and triton are taken from the base image; every other dependency
# (megatron-core, sglang, sglang-router, nvdlfw-inspect, prometheus-client, ...) is installed at
# the exact version in requirements/pins.txt, the file the CPU set-up (Makefile) installs from.
# SGLang is installed as that set-up does: its run-time set, then SGLang itself without deps.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/megatron-dapo

COPY requirements/ requirements/
# NGC images (25.03 and later) constrain pip to the versions they were built with, in
# /etc/pip/constraint.txt (editing it is NVIDIA's documented way to install other versions):
# only its torch stack, Transformer Engine and apex stay constrained there, so a dependency that
# wants another torch fails the build instead of replacing it, and requirements/pins.txt decides
# every other version.
RUN if [[ -f /etc/pip/constraint.txt ]]; then \
        sed -i -nE '/^(torch|torchvision|triton|pytorch-triton|transformer[-_]engine|apex)[=<>~ ]/Ip' \
            /etc/pip/constraint.txt; \
    fi \
    && grep -vE '^(torch|torchvision|triton)==' requirements/pins.txt > /tmp/pins-gpu.txt \
    && pip install --no-cache-dir -c /tmp/pins-gpu.txt \
        -r requirements/core.txt -r requirements/sglang.txt \
    && pip install --no-cache-dir --no-deps -c /tmp/pins-gpu.txt -r requirements/sglang-nodeps.txt

COPY pyproject.toml README.md ./
COPY pipeline/ pipeline/
COPY megatron_dapo/ megatron_dapo/
COPY launch/ launch/
COPY configs/ configs/
# The run user (a UID above the base image's own users) owns /workspace, where runs write their
# checkpoints, weights and logs (mount a volume there).
RUN pip install --no-cache-dir --no-deps . \
    && useradd --create-home --uid 10001 --user-group dapo \
    && install -d -o 10001 -g 10001 /workspace
USER 10001
WORKDIR /workspace
ENV DAPO_ROOT=/opt/megatron-dapo \
    DAPO_PYTHON=python
ENTRYPOINT ["/opt/megatron-dapo/launch/container_entrypoint.sh"]
CMD ["help"]
