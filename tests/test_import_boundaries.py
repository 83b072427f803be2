"""Imports run only in the directions the packages' `__init__` docstrings state.

Every import statement of the project (module level or inside a function) is checked against
`ALLOWED`: which project packages a package may import, and, where a package promises to stay
free of them, which third-party libraries. A second check imports the pure packages in a fresh
interpreter and asserts that Megatron never loads, which also catches transitive imports.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT = ("megatron_dapo", "pipeline")


@dataclass(frozen=True)
class Rule:
    """What the modules of one package may import.

    Attributes:
        project: project packages or modules it may import (by dotted prefix); its own package
            is always allowed.
        third_party: if set, the only third-party top-level packages it may import (the
            standard library is always allowed); None = any except `forbidden`.
        forbidden: third-party packages it must never import.
    """

    project: tuple[str, ...]
    third_party: tuple[str, ...] | None = None
    forbidden: tuple[str, ...] = ()


ALLOWED: dict[str, Rule] = {
    "pipeline": Rule(project=(), forbidden=("megatron",)),
    "megatron_dapo.algo": Rule(project=("pipeline.registry",), third_party=("torch",)),
    "megatron_dapo.config": Rule(
        project=("megatron_dapo.algo", "pipeline"), third_party=("pydantic", "yaml")
    ),
    "megatron_dapo.mcore": Rule(
        project=(
            "megatron_dapo.algo",
            "megatron_dapo.config",
            "megatron_dapo.hf",
            "pipeline.train_batch",
        )
    ),
    "megatron_dapo.hf": Rule(
        project=(
            "megatron_dapo.config",
            "pipeline.config",
            "pipeline.tokenizer",
            "pipeline.weight_sync",
        )
    ),
    "megatron_dapo.ckpt": Rule(
        project=("megatron_dapo.config", "megatron_dapo.mcore", "pipeline.parent_death")
    ),
    "megatron_dapo.report": Rule(
        project=("megatron_dapo.config", "megatron_dapo.mcore", "pipeline"),
        forbidden=("megatron",),
    ),
    "megatron_dapo.cli": Rule(project=PROJECT),
    "megatron_dapo.train": Rule(project=PROJECT),
    # the `sft` command's loop, like `train`'s: its data (pipeline.sft_data), trainer and report
    "megatron_dapo.sft": Rule(project=PROJECT),
    "megatron_dapo": Rule(project=()),  # the package docstring only
}
"""Package (or top-level module) -> its rule; the longest matching prefix applies."""


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def _project_modules() -> list[Path]:
    return sorted(p for package in PROJECT for p in (REPO / package).rglob("*.py"))


def _rule_of(module: str) -> tuple[str, Rule]:
    owner = max(
        (name for name in ALLOWED if module == name or module.startswith(name + ".")),
        key=len,
        default=None,
    )
    assert owner is not None, f"{module} belongs to no package of ALLOWED: add its rule"
    return owner, ALLOWED[owner]


def _imports(source: str) -> set[str]:
    """Dotted names of everything `source` imports (`from a import b` gives `a.b`)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "the project uses absolute imports only"
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _violations(module: str, source: str) -> list[str]:
    owner, rule = _rule_of(module)
    problems = []
    for name in sorted(_imports(source)):
        root = name.split(".")[0]
        if root in PROJECT:
            if not any(_within(name, allowed) for allowed in (owner, *rule.project)):
                problems.append(f"{module} imports {name}")
        elif root in sys.stdlib_module_names or root == "__future__":
            continue
        elif root in rule.forbidden or (
            rule.third_party is not None and root not in rule.third_party
        ):
            problems.append(f"{module} imports third-party {root}")
    return problems


def test_every_import_follows_the_allowed_directions() -> None:
    problems = [
        problem
        for path in _project_modules()
        for problem in _violations(_module_name(path), path.read_text())
    ]
    assert problems == []


def test_every_package_has_a_rule_and_says_what_it_may_import() -> None:
    packages = sorted({p.parent for p in _project_modules()})
    for package in packages:
        name = _module_name(package / "__init__.py")
        _rule_of(name)
        docstring = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
        assert docstring, f"{name}/__init__.py has no docstring saying what it holds"
        if name.startswith("megatron_dapo."):
            assert "May import:" in docstring, f"{name}: say what it may import"


def test_the_checker_catches_a_wrong_direction() -> None:
    # a control: the data plane importing the training plane, the algorithm importing Megatron
    # (inside a function), HF conversion reaching into the Megatron model code
    bad = {
        "pipeline.queue": "from megatron_dapo.algo.objective import policy_objective\n",
        "megatron_dapo.algo.bad": "def f():\n    import megatron.core\n",
        "megatron_dapo.hf.bad": "from megatron_dapo.mcore.model import build_model_chunks\n",
        "megatron_dapo.algo.good": "import math\nimport torch\nfrom pipeline.registry import R\n",
    }
    found = [problem for module, source in bad.items() for problem in _violations(module, source)]
    assert found == [
        "pipeline.queue imports megatron_dapo.algo.objective.policy_objective",
        "megatron_dapo.algo.bad imports third-party megatron",
        "megatron_dapo.hf.bad imports megatron_dapo.mcore.model.build_model_chunks",
    ]


@pytest.mark.parametrize("package", ["pipeline", "megatron_dapo.algo", "megatron_dapo.config"])
def test_importing_a_pure_package_loads_no_megatron(package: str) -> None:
    modules = [
        _module_name(path) for path in _project_modules() if _within(_module_name(path), package)
    ]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'megatron'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
