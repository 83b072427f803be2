"""Bad input to the data plane ends in a clear error or a counted skip, never a hang.

Data-plane settings that cannot work are config errors naming the key (the generic cases,
unknown keys, types, YAML syntax, are in `tests/config/test_run_config.py`).

Malformed prompt-file rows are errors naming file, line and field (not skips: a data set is
fixed once). Over-long prompts are counted skips (`test_prompts_source`,
`test_queue_dynamic_sampling`); reward functions that raise or hang are counted and scored as
wrong (`test_queue_dynamic_sampling`, `test_math_verify_reward`); a server that hangs is cut by
the request timeout (`test_fleet_failover`). A server answering `/generate` with malformed JSON
is played by a stand-in here, since a real SGLang server never does.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import aiohttp
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web

from megatron_dapo.config.loading import ConfigError, load_config
from pipeline.config import DataConfig
from pipeline.prompts import MAX_REPORTED_ROWS, MalformedPromptData, load_rows
from pipeline.rollout_client import RolloutClient
from pipeline.sglang_client import MalformedResponse, SamplingParams, SGLangServerClient

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo-cpu.yaml"
GOOD = {"prompt": [{"role": "user", "content": "1 + 1?"}], "reward_model": {"ground_truth": "2"}}


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ("rollout.mode=cluster", "cluster mode needs rollout.server_urls or rollout.router_url"),
        ("data.source=jsonl", "data.source='jsonl' needs data.path"),
        ("data.task=null", "data.source='reasoning_gym' needs data.task"),
        ("rollout.revival_timeout_s=-1", "rollout.revival_timeout_s = -1: Input should be"),
        ("reward.timeout_s=0", "reward.timeout_s = 0: Input should be greater than 0"),
    ],
)
def test_a_bad_data_plane_setting_is_a_config_error_naming_it(override, problem):
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_config(DEMO, [override])


def write_jsonl(path: Path, lines: list[str]) -> DataConfig:
    path.write_text("".join(line + "\n" for line in lines))
    return DataConfig(source="jsonl", path=str(path))


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ('{"prompt": "1 + 1?", "reward_model": {"ground_truth": "2"}', "invalid JSON"),
        ("[1, 2]", "the row is a list, not an object"),
        ('{"reward_model": {"ground_truth": "2"}}', "field 'prompt': missing"),
        ('{"prompt": null, "reward_model": {"ground_truth": "2"}}', "field 'prompt': missing"),
        ('{"prompt": "1 + 1?", "reward_model": {}}', "field 'reward_model.ground_truth': missing"),
        ('{"prompt": "1 + 1?", "answer": "2"}', "field 'reward_model.ground_truth': missing"),
        ('{"prompt": 42, "reward_model": {"ground_truth": "2"}}', "field 'prompt': expected a"),
        (
            '{"prompt": [{"role": "user"}], "reward_model": {"ground_truth": "2"}}',
            "field 'prompt': expected a string or a list of {'role': str, 'content': str}",
        ),
        (
            '{"prompt": "1 + 1?", "reward_model": {"ground_truth": ["2"]}}',
            "field 'reward_model.ground_truth': expected a string or a number, got list",
        ),
        (
            '{"prompt": "1 + 1?", "reward_model": {"ground_truth": true}}',
            "field 'reward_model.ground_truth': expected a string or a number, got bool",
        ),
        ('{"prompt": "  ", "reward_model": {"ground_truth": "2"}}', "field 'prompt': empty prompt"),
        ('{"prompt": [], "reward_model": {"ground_truth": "2"}}', "field 'prompt': empty prompt"),
        (
            '{"prompt": [{"role": "user", "content": ""}], "reward_model": {"ground_truth": "2"}}',
            "field 'prompt': empty prompt",
        ),
        (
            '{"prompt": "1 + 1?", "reward_model": {"ground_truth": ""}}',
            "field 'reward_model.ground_truth': empty answer",
        ),
    ],
)
def test_a_malformed_jsonl_row_is_an_error_naming_file_line_and_field(tmp_path, bad_line, problem):
    # The blank line counts: the bad row is line 3 of the file.
    config = write_jsonl(tmp_path / "prompts.jsonl", [json.dumps(GOOD), "", bad_line])
    with pytest.raises(MalformedPromptData) as error:
        load_rows(config)
    message = str(error.value)
    assert message.startswith(f"1 malformed row(s) in {config.path}")
    assert f"{config.path}:3: {problem}" in message
    assert f"{config.path}:1:" not in message


def test_every_malformed_row_is_counted_and_the_first_ones_listed(tmp_path):
    lines = [json.dumps(GOOD), *['{"prompt": 1}'] * (MAX_REPORTED_ROWS + 2), json.dumps(GOOD)]
    config = write_jsonl(tmp_path / "prompts.jsonl", lines)
    with pytest.raises(MalformedPromptData, match=rf"^{MAX_REPORTED_ROWS + 2} malformed") as error:
        load_rows(config)
    listed = re.findall(rf"{re.escape(config.path)}:(\d+): ", str(error.value))
    assert listed == [str(n) for n in range(2, MAX_REPORTED_ROWS + 2)]


def test_numeric_answers_string_prompts_a_bom_and_crlf_are_accepted(tmp_path):
    rows = [{"prompt": "1 + 1?", "reward_model": {"ground_truth": 2}}, GOOD]
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps(r).encode() + b"\r\n" for r in rows))
    config = DataConfig(source="jsonl", path=str(path))
    loaded = load_rows(config)
    assert [r.ground_truth for r in loaded] == ["2", "2"]
    assert loaded[0].messages == [{"role": "user", "content": "1 + 1?"}]


def test_a_parquet_row_with_a_null_field_is_an_error_naming_the_row(tmp_path):
    path = tmp_path / "prompts.parquet"
    rows = [GOOD, {"prompt": None, "reward_model": {"ground_truth": "3"}}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(MalformedPromptData, match=rf"{re.escape(str(path))} row 1: field 'prompt'"):
        load_rows(DataConfig(source="parquet", path=str(path)))


GENERATE_ANSWERS = {
    "not-json": (web.Response(text="<html>Bad Gateway</html>"), "a str, not a list of 1"),
    "empty": (web.Response(text=""), "a NoneType, not a list of 1"),
    "object": (web.json_response({"output_ids": [7]}), "a dict, not a list of 1"),
    "two": (web.json_response([{}, {}]), "a list of 2, not a list of 1"),
    "not-object": (web.json_response([1]), "a int, not a JSON object"),
    "no-meta": (web.json_response([{"output_ids": [7]}]), "no field 'meta_info'"),
    "wrong-type": (
        web.json_response(
            [
                {
                    "output_ids": ["seven"],
                    "meta_info": {"output_token_logprobs": [], "finish_reason": {"type": "stop"}},
                }
            ]
        ),
        "a field of the wrong type",
    ),
    "id-mismatch": (
        web.json_response(
            [
                {
                    "output_ids": [7],
                    "meta_info": {
                        "output_token_logprobs": [[-0.1, 8, None]],
                        "finish_reason": {"type": "stop"},
                    },
                }
            ]
        ),
        "log-prob token ids that differ from output_ids",
    ),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("answer", sorted(GENERATE_ANSWERS))
def test_a_malformed_generate_answer_is_an_error_naming_the_server(answer):
    response, problem = GENERATE_ANSWERS[answer]
    calls = 0

    async def generate(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return response

    async def main() -> str:
        app = web.Application()
        app.router.add_post("/generate", generate)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        try:
            async with aiohttp.ClientSession() as session:
                client = RolloutClient([SGLangServerClient(url, session, timeout_s=10.0)])
                with pytest.raises(MalformedResponse) as error:
                    await client.generate([1, 2], SamplingParams(max_new_tokens=1))
                assert [w.url for w in client.live_workers] == [url], "not a server failure"
                return url, str(error.value)
        finally:
            await runner.cleanup()

    url, message = asyncio.run(main())
    assert message.startswith(f"{url}/generate answered with {problem}")
    assert calls == 1, "a malformed answer is not retried"
