"""launch/gpu_smoke.sh on a machine without a GPU: it parses, its Python checks compile, and it
refuses at once with a FAIL for CUDA, a non-zero exit and no traceback. (Its other checks need a
GPU: a user with one runs the script.)"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from launch_test_helpers import REPO, clean_env

SMOKE = REPO / "launch" / "gpu_smoke.sh"


def test_script_parses_and_its_python_checks_compile() -> None:
    subprocess.run(["bash", "-n", str(SMOKE)], check=True, timeout=30)
    snippets = re.findall(r"\bpy '(.*?)'", SMOKE.read_text(), re.S)
    assert len(snippets) >= 5
    for code in snippets:
        compile(code, str(SMOKE), "exec")


def test_without_a_gpu_it_fails_the_cuda_check_and_stops(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", str(SMOKE)],
        cwd=tmp_path,
        env=clean_env(CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0].startswith("FAIL  CUDA visible: torch ") and "sees no CUDA device" in lines[0]
    assert lines[1:] == ["the remaining checks need a GPU: stopping"]
    assert "Traceback" not in done.stdout + done.stderr
    assert (tmp_path / "runs" / "gpu-smoke" / "logs" / "CUDA-visible.log").is_file()
