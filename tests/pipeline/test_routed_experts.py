"""Routes in `/generate` answers (MoE routing replay): SGLang's `meta_info["routed_experts"]`
is base64 of int32 `[prompt + response - 1, layers, top-k]`; the client parses it into the
compact dtype and names a malformed one."""

from __future__ import annotations

import base64

import pytest
import torch

from pipeline.sglang_client import Generation, MalformedResponse
from pipeline.train_batch import ExpertRouting

ROUTING = ExpertRouting(num_layers=2, topk=2, num_experts=4)
PROMPT_LENGTH = 3


def answer(routes: torch.Tensor | None, finish: str = "length") -> dict:
    """A `/generate` body of 2 response tokens, with `routes` (int32) encoded as SGLang does."""
    meta = {
        "output_token_logprobs": [[-0.1, 7, None], [-0.2, 8, None]],
        "finish_reason": {"type": finish},
    }
    if routes is not None:
        meta["routed_experts"] = base64.b64encode(routes.to(torch.int32).numpy().tobytes()).decode()
    return {"output_ids": [7, 8], "meta_info": meta}


def routes(rows: int = PROMPT_LENGTH + 1) -> torch.Tensor:
    """[rows, 2, 2]: row p routed to (p % 4, (p + 1) % 4) at both layers."""
    first = torch.arange(rows) % 4
    return torch.stack([first, (first + 1) % 4], dim=1).unsqueeze(1).expand(rows, 2, 2)


def parse(body: dict, routing: ExpertRouting | None = ROUTING) -> Generation:
    return Generation.from_response(body, "http://server", PROMPT_LENGTH, routing)


def test_routes_of_every_token_but_the_last_in_the_compact_dtype() -> None:
    generation = parse(answer(routes()))
    assert generation.routed_experts.dtype == torch.uint8
    assert torch.equal(generation.routed_experts, routes().to(torch.uint8))
    assert parse(answer(routes()), routing=None).routed_experts is None
    assert parse(answer(None, finish="abort")).routed_experts is None


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (answer(None), "no routed_experts .*--enable-return-routed-experts"),
        (answer(routes(PROMPT_LENGTH + 2)), r"routed_experts that are not int32 \[4, 2, 2\]"),
        (answer(routes() + 1), r"routed_experts outside \[0, 4\)"),
    ],
)
def test_malformed_routes_name_the_problem(body: dict, problem: str) -> None:
    with pytest.raises(MalformedResponse, match=f"http://server/generate answered with {problem}"):
        parse(body)
