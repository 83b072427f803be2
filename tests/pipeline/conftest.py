"""Shared fixtures of the data-plane tests: tiny models and one embedded SGLang fleet.

The fleet (two CPU servers of a tiny random-weight Llama) is started once per test session,
lazily, by the first test that asks for it, and stopped by PID at session end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pipeline.config import RolloutConfig
from pipeline.fleet import EmbeddedFleetOptions, RolloutFleet
from pipeline.sglang_server import http_get
from pipeline.tokenizer import TinyModelConfig, write_tiny_model


@dataclass(frozen=True)
class TinyModels:
    """Two random-weight policies of the same shape (seeds 0 and 1)."""

    base: Path
    other: Path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    root = tmp_path_factory.mktemp("tiny-models")
    return TinyModels(
        base=write_tiny_model(root / "seed0", TinyModelConfig(seed=0)),
        other=write_tiny_model(root / "seed1", TinyModelConfig(seed=1)),
    )


@pytest.fixture(scope="session")
def sglang_fleet(
    tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RolloutFleet]:
    """Two local SGLang servers on CPU serving `tiny_models.base`."""
    log_dir = tmp_path_factory.mktemp("sglang-logs")
    config = RolloutConfig(num_servers=2, max_inflight_per_server=8, request_timeout_s=120.0)
    options = EmbeddedFleetOptions(str(tiny_models.base), log_dir, start_timeout_s=400.0)
    with RolloutFleet(config, options) as fleet:
        yield fleet


@pytest.fixture
def live_urls(sglang_fleet: RolloutFleet) -> list[str]:
    """The fleet's workers that still answer (a failover test kills one)."""
    urls = [u for u in sglang_fleet.worker_urls if http_get(f"{u}/health")[0] == 200]
    assert urls, "no SGLang server of the test fleet is alive"
    return urls


ReferenceLogprobs = Callable[[Path, Sequence[int], Sequence[int]], torch.Tensor]


def _reference_logprobs(model_dir: Path, prompt: Sequence[int], output: Sequence[int]):
    """[T] log p(output_t | prompt, output_<t) from a transformers forward pass, nats."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[*prompt, *output]])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].double()
    return logits.log_softmax(-1).gather(-1, torch.tensor(output)[:, None])[:, 0]


@pytest.fixture(scope="session")
def reference_logprobs() -> ReferenceLogprobs:
    """Independent log-probs of a response under an HF model directory's weights."""
    return _reference_logprobs
