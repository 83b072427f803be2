"""A random-weight HF checkpoint written from `RunConfig.model` (runs that start from scratch)."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer

from megatron_dapo.config.hf_architecture import model_fields_from_hf
from megatron_dapo.config.loading import load_config
from megatron_dapo.hf.initial_checkpoint import write_random_checkpoint

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo-cpu.yaml"


def test_demo_model_is_written_as_a_mixtral_checkpoint_of_its_shape(tmp_path: Path) -> None:
    model = load_config(DEMO).model
    out = write_random_checkpoint(model, tmp_path / "a", seed=3)
    fields = model_fields_from_hf(out)
    assert fields["moe"]["num_experts"] == model.moe.num_experts
    assert fields["moe"]["router_topk"] == model.moe.router_topk
    assert (fields["num_layers"], fields["hidden_size"]) == (model.num_layers, model.hidden_size)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.decode(tokenizer.encode("3 + 4 = 7")) == "3 + 4 = 7"
    same = load_file(write_random_checkpoint(model, tmp_path / "b", seed=3) / "model.safetensors")
    other = load_file(write_random_checkpoint(model, tmp_path / "c", seed=4) / "model.safetensors")
    weights = load_file(out / "model.safetensors")
    assert all(weights[k].equal(same[k]) for k in weights), "the seed must fix the weights"
    assert any(not weights[k].equal(other[k]) for k in weights)


def test_architecture_must_fit_the_model_section(tmp_path: Path) -> None:
    config = load_config(DEMO, ["model.random_init=llama"])
    with pytest.raises(ValueError, match="'llama' is a dense architecture"):
        write_random_checkpoint(config.model, tmp_path, seed=0)


def test_vocabulary_must_hold_the_tokenizer(tmp_path: Path) -> None:
    config = load_config(DEMO, ["model.vocab_size=50"])
    with pytest.raises(ValueError, match="smaller than the character tokenizer"):
        write_random_checkpoint(config.model, tmp_path, seed=0)
