"""Stop tokens: derived from the checkpoint (end-of-sequence ids and the chat template's
end-of-turn token), and honoured by a real SGLang server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from transformers import AutoTokenizer

from pipeline.config import RolloutConfig
from pipeline.fleet import EmbeddedFleetOptions, RolloutFleet
from pipeline.sglang_client import SamplingParams, SGLangServerClient
from pipeline.stop_tokens import (
    default_stop_token_ids,
    end_of_turn_token_id,
    resolve_stop_token_ids,
)
from pipeline.tokenizer import EOS_TOKEN, UNK_TOKEN, TinyModelConfig, write_tiny_model


def _with_eos(model_dir: Path, eos_token: str) -> Path:
    """`model_dir` rewritten so that `eos_token` is its end-of-sequence token everywhere
    (config, generation config, tokenizer), not the chat template's `<|im_end|>`."""
    eos_id = AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids(eos_token)
    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        data = json.loads(path.read_text())
        path.write_text(json.dumps({**data, "eos_token_id": eos_id}))
    path = model_dir / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "eos_token": eos_token}))
    return model_dir


@pytest.fixture(scope="module")
def chat_model_with_another_eos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama whose EOS is `<|unk|>` while its chat turns end with `<|im_end|>`."""
    model = write_tiny_model(tmp_path_factory.mktemp("eos") / "model", TinyModelConfig(seed=3))
    return _with_eos(model, UNK_TOKEN)


def test_the_end_of_turn_token_joins_the_end_of_sequence_ids(chat_model_with_another_eos):
    tokenizer = AutoTokenizer.from_pretrained(chat_model_with_another_eos)
    unk, im_end = tokenizer.convert_tokens_to_ids([UNK_TOKEN, EOS_TOKEN])
    assert tokenizer.eos_token_id == unk != im_end
    assert end_of_turn_token_id(tokenizer) == im_end
    assert default_stop_token_ids(chat_model_with_another_eos) == tuple(sorted((unk, im_end)))
    assert resolve_stop_token_ids((7,), chat_model_with_another_eos) == (7,)
    assert resolve_stop_token_ids((), chat_model_with_another_eos) == ()


@pytest.mark.slow
def test_smollm2_stops_at_im_end(smollm2_checkpoint: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_token_id(tokenizer) == im_end
    assert im_end in default_stop_token_ids(smollm2_checkpoint)


@pytest.mark.slow
@pytest.mark.server
def test_a_real_server_stops_at_the_derived_end_of_turn(chat_model_with_another_eos, tmp_path):
    """16 samples of 48 tokens from a near-uniform tiny policy: with the derived stop ids no
    response runs past `<|im_end|>` and some end with it; without them some run past it."""
    tokenizer = AutoTokenizer.from_pretrained(chat_model_with_another_eos)
    im_end = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say something."}],
        add_generation_prompt=True,
        return_dict=False,
    )
    derived = resolve_stop_token_ids(None, chat_model_with_another_eos)
    options = EmbeddedFleetOptions(str(chat_model_with_another_eos), tmp_path, dtype="float32")

    async def sample(stop_token_ids: tuple[int, ...]) -> list:
        params = SamplingParams(max_new_tokens=48, stop_token_ids=stop_token_ids)
        async with aiohttp.ClientSession() as session:
            server = SGLangServerClient(fleet.worker_urls[0], session, timeout_s=120.0)
            return await asyncio.gather(*(server.generate(prompt, params) for _ in range(16)))

    with RolloutFleet(RolloutConfig(num_servers=1), options) as fleet:
        stopped, unstopped = asyncio.run(sample(derived)), asyncio.run(sample(()))
    assert not any(im_end in g.output_ids[:-1] for g in stopped)
    assert any(g.output_ids[-1] == im_end and g.finish_reason == "stop" for g in stopped)
    assert any(im_end in g.output_ids[:-1] for g in unstopped)
