"""The supervised warm-up (`megatron-dapo sft`) on a tiny random Llama with the character-level
tokenizer, learning a fixed colour -> fruit mapping from a procedurally written jsonl
(`sft_worker`):

* the command (one CPU rank, a subprocess) lowers the loss of its first step by more than 85%
  over its 24 steps, writes `metrics.jsonl` and an HF checkpoint;
* one step's loss and gradient equal an independent computation: the unwrapped model's
  full-vocabulary log_softmax on each sample alone, -mean log p over the response tokens;
* the written checkpoint loads in the RL trainer, whose recomputed pi_old equals transformers'
  log-probs of it, and a real CPU SGLang server serves it with transformers' log-probs;
* TP2, DP2 and PP2 (2-rank torchrun) give the losses of one rank;
* bad input stops the command with the file, line and field and what was expected.

Measured on 2 shared cores: the command 7 s, the three 2-rank layouts 18 s, the server test
54 s (one server start), the module 90 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hf_worker import hf_log_probs
from launch_helpers import REPO, run_torchrun
from pi_old_worker import fleet_batch
from sft_worker import (
    BATCH_SIZE,
    FRUIT,
    LAYOUTS,
    first_losses,
    make_sft_checkpoint,
    sft_config,
    sft_config_dict,
    sft_trainer,
    write_pairs,
)
from test_weight_sync_sglang import SERVER, on_server
from training_helpers import unpacked_log_probs
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_dapo.cli import main
from megatron_dapo.config.schema import RunConfig
from megatron_dapo.mcore.policy_step import PolicyTrainer
from pipeline.prompts import prompt_token_ids
from pipeline.sglang_server import free_port

HERE = Path(__file__).resolve().parent
LOSS_DROP = 0.15
"""The mean loss of the last 4 steps is below this fraction of the first step's (measured:
4.82 -> 0.25, 0.05)."""


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, jsonl) of the warm-up."""
    root = tmp_path_factory.mktemp("sft")
    return make_sft_checkpoint(root / "initial"), write_pairs(root / "pairs.jsonl")


def _write_config(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def warmed_up(material: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output directory of `megatron-dapo sft` run on one rank in a subprocess."""
    checkpoint, data = material
    root = tmp_path_factory.mktemp("sft-run")
    output = root / "warm"
    config = _write_config(root / "sft.yaml", sft_config_dict(checkpoint, data, output))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    subprocess.run(
        [sys.executable, "-m", "megatron_dapo.cli", "sft", str(config)],
        env={**env, "PYTHONPATH": str(REPO)},
        check=True,
        timeout=600,
    )
    return output


@pytest.mark.slow
def test_the_command_lowers_the_loss_and_writes_a_checkpoint(warmed_up: Path) -> None:
    records = [json.loads(line) for line in (warmed_up / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    print("sft losses:", " ".join(f"{loss:.3f}" for loss in losses))
    steps_per_epoch = len(FRUIT) * 4 // BATCH_SIZE
    assert [r["step"] for r in records] == list(range(1, 6 * steps_per_epoch + 1))
    assert records[-1]["epoch"] == 6
    assert all(r["update_successful"] and r["num_loss_tokens"] > 0 for r in records)
    assert sum(losses[-4:]) / 4 < LOSS_DROP * losses[0]
    written = {p.name for p in warmed_up.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= written


@pytest.mark.slow
def test_one_step_loss_and_gradient_equal_full_vocabulary_log_softmax(
    material: tuple[Path, Path], single_rank: None, tmp_path: Path
) -> None:
    checkpoint, data = material
    values = sft_config_dict(checkpoint, data, tmp_path / "unused")
    values["sft"]["optimizer"]["clip_grad"] = 0.0  # clipping would scale the gradients
    trainer, pairs = sft_trainer(RunConfig.model_validate(values), total_steps=1)
    batch = pairs.batch(0, BATCH_SIZE)
    log_probs, _, keep, _ = unpacked_log_probs(trainer, batch)
    mask = batch.loss_mask[keep]
    expected = -log_probs[mask].mean()
    (chunk,) = trainer.chunks
    chunk.zero_grad_buffer()
    expected.backward()
    params = list(trainer.models[0].parameters())
    expected_grads = [p.main_grad.clone() for p in params]

    metrics = trainer.step(batch)

    assert 1 < metrics.num_microbatches < BATCH_SIZE  # packed: rows of several samples
    assert metrics.num_loss_tokens == int(mask.sum())
    assert metrics.loss == pytest.approx(expected.item(), rel=1e-6)
    for param, grad in zip(params, expected_grads, strict=True):
        torch.testing.assert_close(param.main_grad, grad, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_the_written_checkpoint_loads_in_the_rl_trainer(
    warmed_up: Path, single_rank: None, tmp_path: Path
) -> None:
    trainer = PolicyTrainer(sft_config(warmed_up, Path("unused.jsonl"), tmp_path))
    batch = fleet_batch(warmed_up)  # rollout log-probs: transformers' under the checkpoint
    mismatch = trainer.train(batch).mismatch
    assert mismatch is not None
    print(f"pi_old vs transformers: max |diff| {float(mismatch.max_abs_diff):.2e}")
    assert float(mismatch.max_abs_diff) < 1e-4


@pytest.mark.slow
@pytest.mark.server
def test_sglang_serves_the_written_checkpoint_with_transformers_log_probs(
    warmed_up: Path, tmp_path: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(warmed_up)
    prompt = prompt_token_ids(tokenizer, [{"role": "user", "content": "Fruit of red?"}], True)
    sequence = [*prompt, *tokenizer.encode("apple<|im_end|>", add_special_tokens=False)]

    async def body(server) -> tuple[float, ...]:
        return await server.sequence_logprobs(sequence)

    assert "--skip-tokenizer-init" in SERVER.server_args  # token ids in and out
    scores = on_server(warmed_up, tmp_path / "logs", body, dtype="float32")  # as trained
    served = torch.tensor(scores, dtype=torch.float64)
    hf = AutoModelForCausalLM.from_pretrained(warmed_up, dtype=torch.float32).eval()
    expected = hf_log_probs(hf, torch.tensor([sequence]))[0]
    print(f"SGLang vs transformers: max |diff| {(served - expected).abs().max():.2e}")
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=0)  # measured 7.5e-7
    answer = expected[len(prompt) - 1 :]
    assert answer.mean() > -1.0  # the warmed-up policy writes the fruit: p > 1/e per token


@pytest.mark.slow
@pytest.mark.multirank
def test_two_rank_layouts_give_the_one_rank_losses(
    material: tuple[Path, Path], single_rank: None, tmp_path: Path
) -> None:
    checkpoint, data = material
    one_rank = first_losses(sft_config(checkpoint, data, tmp_path / "one"))
    out = tmp_path / "layouts.json"
    run_torchrun(HERE / "sft_worker.py", str(checkpoint), str(data), str(out))
    results = json.loads(out.read_text())
    print(json.dumps({"one_rank": one_rank, **results}, indent=1))
    assert set(results) == set(LAYOUTS)
    for name, losses in results.items():
        assert losses == pytest.approx(one_rank, rel=1e-5), name
    assert one_rank[-1] < one_rank[0]  # the steps did train


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ('{"prompt": "Fruit of red?"}', "pairs.jsonl:2: field 'response': missing"),
        ('{"prompt": 3, "response": "x"}', "pairs.jsonl:2: field 'prompt': expected a string"),
        ("{not json", "pairs.jsonl:2: invalid JSON"),
    ],
)
def test_bad_rows_name_file_line_field_and_what_was_expected(
    material: tuple[Path, Path], tmp_path: Path, row: str, expected: str, capsys
) -> None:
    checkpoint, _ = material
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "Fruit of red?", "response": "apple"}\n' + row + "\n")
    config = _write_config(tmp_path / "sft.yaml", sft_config_dict(checkpoint, data, tmp_path / "o"))
    assert main(["sft", str(config)]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "sft.data.prompt_key='prompt', sft.data.response_key='response'" in err


def test_a_missing_data_file_an_existing_checkpoint_or_no_sft_section_is_named(
    material: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    checkpoint, _ = material
    values = sft_config_dict(checkpoint, tmp_path / "nowhere.jsonl", tmp_path / "o")
    config = _write_config(tmp_path / "sft.yaml", values)
    assert main(["sft", str(config)]) == 2
    assert f"sft.data.path={tmp_path / 'nowhere.jsonl'}: no such file" in capsys.readouterr().err
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "config.json").write_text("{}")
    values["sft"]["data"]["path"] = str(write_pairs(tmp_path / "pairs.jsonl"))
    config = _write_config(tmp_path / "sft.yaml", values)
    assert main(["sft", str(config)]) == 2
    assert f"sft.output_dir={tmp_path / 'o'} already holds a checkpoint" in capsys.readouterr().err
    del values["sft"]
    config = _write_config(tmp_path / "rl.yaml", values)
    assert main(["sft", str(config)]) == 2
    assert "has no sft section" in capsys.readouterr().err
