"""Weight sync through Megatron-Core is the identity on a real SGLang server.

A CPU server starts on HF checkpoint A and scores fixed token sequences (prefill log-probs);
A is then imported into a Megatron-Core model (`load_hf_checkpoint`), exported again
(`export_hf_checkpoint`) and loaded by the server (`update_weights_from_disk`): the log-probs
must be the same, bit for bit. The control loads an export whose final norm was scaled by 1%,
which must change them, so an update that did nothing or a test blind to the weights fails.

Cases: SmolLM2-135M-Instruct (Llama, tied, 9 query / 3 key-value heads) on a chat-template
prompt and answer, and tiny random models of the five mapped architectures (`hf_worker`:
untied Llama, tied Qwen2 with qkv bias, Qwen3 with qk-norm, Qwen3-MoE, Mixtral; all GQA) on
random token ids. One server per case, one after another, stopped by PID when its case ends;
measured on 2 cores: 28-40 s per tiny case, 49 s for SmolLM2, 3 min 50 s for the module.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import aiohttp
import pytest
import torch
from hf_worker import ARCHITECTURES, build_from_hf, chat_turn, make_hf_checkpoint, tokens_for_test

from megatron_dapo.hf.convert import export_hf_checkpoint
from pipeline.config import RolloutConfig
from pipeline.fleet import EmbeddedFleetOptions, RolloutFleet
from pipeline.sglang_client import SGLangServerClient

pytestmark = [pytest.mark.slow, pytest.mark.server]

T = TypeVar("T")
SERVER = RolloutConfig(num_servers=1, server_args=("--skip-tokenizer-init",))
"""One server; token ids in, so the tiny models need no tokenizer."""
CONTROL_SCALE = 1.01
"""The control's final-norm weights are A's times this."""


def on_server(
    model_dir: Path,
    log_dir: Path,
    body: Callable[[SGLangServerClient], Awaitable[T]],
    dtype: str | None = None,
) -> T:
    """Run `body` against a fresh CPU server of `model_dir` (up within 240 s, stopped after),
    computing in `dtype` (None: SGLang's choice, float16 for a float32 checkpoint)."""
    options = EmbeddedFleetOptions(str(model_dir), log_dir, start_timeout_s=240.0, dtype=dtype)

    async def main() -> T:
        async with aiohttp.ClientSession() as session:
            return await body(SGLangServerClient(fleet.worker_urls[0], session, timeout_s=120.0))

    with RolloutFleet(SERVER, options) as fleet:
        return asyncio.run(main())


@pytest.mark.parametrize("model_type", ["smollm2", *sorted(ARCHITECTURES)])
def test_megatron_round_trip_keeps_server_log_probs(model_type, single_rank, request, tmp_path):
    if model_type == "smollm2":
        source = request.getfixturevalue("smollm2_checkpoint")
        prompt, response = chat_turn(source)
        sequences = [prompt + response]  # [1, 56]
    else:
        source = tmp_path / "source"
        make_hf_checkpoint(model_type, source)
        sequences = tokens_for_test().tolist()  # [2, 12] random ids
    exported, control = tmp_path / "exported", tmp_path / "control"
    (chunk,) = build_from_hf(source)
    export_hf_checkpoint([chunk], exported, source)
    with torch.no_grad():
        chunk.decoder.final_layernorm.weight.mul_(CONTROL_SCALE)
    export_hf_checkpoint([chunk], control, source)

    async def body(server: SGLangServerClient) -> list[list[tuple[float, ...]]]:
        scores = [[await server.sequence_logprobs(s) for s in sequences]]
        for version, checkpoint in enumerate((exported, control), start=1):
            await server.update_weights_from_disk(str(checkpoint), weight_version=str(version))
            scores.append([await server.sequence_logprobs(s) for s in sequences])
        return scores

    before, synced, changed = on_server(source, tmp_path / "logs", body)
    assert synced == before, "the Megatron-Core round trip changed the server's log-probs"
    pairs = zip(sum(before, ()), sum(changed, ()), strict=True)
    diff = max(abs(a - b) for a, b in pairs)
    assert diff > 1e-3, f"the control checkpoint left the log-probs unchanged ({diff})"
