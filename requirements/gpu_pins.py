"""The GPU images' constraints: requirements/pins.txt, with requirements/gpu-pins.txt's versions
taking precedence for the packages it names.

    python requirements/gpu_pins.py constraints       print them (the Dockerfile installs with them)
    python requirements/gpu_pins.py lock REPORT.json  rewrite gpu-pins.txt from a `pip install
                                                      --dry-run --report` of the GPU sets
                                                      (`make gpu-pins`)

Standard library only: the Dockerfile runs it before anything is installed.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PINS = HERE / "pins.txt"
GPU_PINS = HERE / "gpu-pins.txt"


def normalize(name: str) -> str:
    """PEP 503: the form in which two spellings of a project name compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, tuple[str, str]]:
    """`name==version` lines of a pins file: normalized name -> (name as written, version)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[normalize(name)] = (name, version)
    return pins


def constraints() -> dict[str, tuple[str, str]]:
    """pins.txt overridden by gpu-pins.txt."""
    return read_pins(PINS) | read_pins(GPU_PINS)


def lock(report: Path) -> None:
    """Keep gpu-pins.txt's comment header; pin every package of the report whose version
    pins.txt does not already give."""
    cpu = read_pins(PINS)
    installed = json.loads(report.read_text())["install"]
    lines = sorted(
        (
            f"{m['name']}=={m['version']}"
            for m in (item["metadata"] for item in installed)
            if cpu.get(normalize(m["name"]), (None, None))[1] != m["version"]
        ),
        key=str.lower,
    )
    header = [line for line in GPU_PINS.read_text().splitlines() if line.startswith("#")]
    GPU_PINS.write_text("\n".join([*header, *lines]) + "\n")


def main(argv: list[str]) -> int:
    if argv == ["constraints"]:
        print("\n".join(f"{name}=={version}" for name, version in constraints().values()))
    elif len(argv) == 2 and argv[0] == "lock":
        lock(Path(argv[1]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
