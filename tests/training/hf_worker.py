"""Tiny HF checkpoints and Megatron-vs-transformers checks, shared by the HF interop tests.

Run under torchrun (gloo) it checks sharded layouts in one launch: for each (checkpoint,
layout) it loads the HF checkpoint into the sharded `GPTModel`, compares the per-token
log-probs with transformers' (every last-stage rank, its own vocab shard), exports, and rank 0
compares the export with the source tensors; rank 0 writes the max errors as JSON to OUT.

    hf_worker.py sharded SCRATCH OUT           the tiny architectures of `SHARDED` (2 ranks)
    hf_worker.py checkpoint DIR TP SCRATCH OUT  the checkpoint DIR with TP = TP ranks, on the
                                               tokens of `chat_turn`
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from megatron_dapo.config.hf_architecture import model_fields_from_hf
from megatron_dapo.config.schema import ModelConfig, ParallelismConfig
from megatron_dapo.hf.convert import export_hf_checkpoint, hf_state_dict, load_hf_checkpoint
from megatron_dapo.mcore.logprobs import vocab_parallel_log_probs
from megatron_dapo.mcore.model import build_model_chunks

VOCAB = 96
_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 5000.0,
}
ARCHITECTURES = {
    "llama": {},
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {"head_dim": 16},
    "qwen3_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 24,
        "norm_topk_prob": True,  # as in the released Qwen3 MoE checkpoints
    },
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
}
# (architecture, parallelism) scenarios of the 2-rank launch
SHARDED = (
    ("qwen2", {"tensor": 2}),
    ("qwen3", {"tensor": 2}),
    ("qwen3_moe", {"expert": 2, "expert_tensor": 1}),
    ("mixtral", {"tensor": 2, "sequence_parallel": True}),
    ("qwen2", {"pipeline": 2}),  # tied embeddings on two stages
)


@torch.no_grad()
def make_hf_checkpoint(model_type: str, directory: Path, seed: int = 0, **changes):
    """A random fp32 transformers model of `model_type` (config fields `changes` on top of
    the tiny defaults) saved to `directory`; returns it."""
    fields = {**_COMMON, **ARCHITECTURES[model_type], **changes}
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    for param in model.parameters():  # norms start at 1 and biases at 0: make every tensor count
        param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(directory)
    return model


def tokens_for_test(seed: int = 1) -> torch.Tensor:
    """[batch=2, seq=12] token ids."""
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


CHAT = (
    {"role": "user", "content": "What is 12 + 30? Answer briefly."},
    {"role": "assistant", "content": "12 + 30 = 42."},
)
"""A user turn and the assistant's answer."""


def chat_turn(checkpoint: Path) -> tuple[list[int], list[int]]:
    """(prompt, response) token ids of `CHAT` with the checkpoint's tokenizer and chat
    template: the prompt ends with the assistant header, the response is the answer and its
    end-of-turn tokens."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompt = tokenizer.apply_chat_template(
        list(CHAT[:1]), add_generation_prompt=True, return_dict=False
    )
    full = tokenizer.apply_chat_template(list(CHAT), return_dict=False)
    assert full[: len(prompt)] == prompt, "the chat template re-renders the prompt differently"
    return list(prompt), list(full[len(prompt) :])


def hf_log_probs(model, tokens: torch.Tensor) -> torch.Tensor:
    """[batch, seq - 1] log p(token t+1 | <= t) from a transformers model."""
    with torch.no_grad():
        logits = model(tokens).logits.double()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)


def build_from_hf(directory: Path, **parallelism) -> list[torch.nn.Module]:
    """Megatron chunks for the checkpoint's architecture, loaded with its weights."""
    model = ModelConfig(**model_fields_from_hf(directory))
    chunks = build_model_chunks(model, ParallelismConfig(backend="gloo", **parallelism))
    load_hf_checkpoint(chunks, directory)
    return [chunk.eval() for chunk in chunks]


def megatron_log_probs(chunk, tokens: torch.Tensor, tp_group=None) -> torch.Tensor:
    """[batch, seq - 1] log-probs from a single-stage GPTModel (vocab-parallel logits)."""
    with torch.no_grad():
        logits = _forward(chunk, tokens)  # [batch, seq, vocab / TP]
    return vocab_parallel_log_probs(logits[:, :-1].double(), tokens[:, 1:], tp_group=tp_group)


def _forward(chunk, tokens: torch.Tensor) -> torch.Tensor:
    batch, seq = tokens.shape
    position_ids = torch.arange(seq).expand(batch, seq)
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    return chunk(tokens, position_ids, causal)


@torch.no_grad()
def _two_stage_log_probs(chunk, tokens: torch.Tensor) -> torch.Tensor:
    """Rank 0 runs the first stage and sends its hidden states [seq, batch, H] to rank 1."""
    from megatron.core import parallel_state as ps

    if ps.is_pipeline_first_stage():
        dist.send(_forward(chunk, tokens).contiguous(), dst=1)
        return torch.zeros(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.float64)
    hidden = torch.empty(tokens.shape[1], tokens.shape[0], chunk.config.hidden_size)
    dist.recv(hidden, src=0)
    chunk.set_input_tensor(hidden)
    return megatron_log_probs(chunk, tokens)


def export_mismatch(source: Path, exported: Path) -> float:
    """inf if the key sets differ, else the max abs difference over all tensors."""
    a, b = hf_state_dict(source), hf_state_dict(exported)
    if set(a) != set(b):
        return float("inf")
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _sharded_errors(
    name: str, source: Path, layout: dict, tokens: torch.Tensor, scratch: Path, env
) -> dict[str, float]:
    """Max errors of one (checkpoint, layout); collective, waits for rank 0 to write `source`.

    Returns `{name}_logprobs`: max |log-prob - transformers'| over every last-stage rank's
    [batch, seq - 1] log-probs; on rank 0 also `{name}_export`: the max abs difference of the
    exported tensors from `source`'s (`export_mismatch`).
    """
    from megatron.core import parallel_state as ps

    from megatron_dapo.mcore.parallel import initialize_parallel

    initialize_parallel(ParallelismConfig(backend="gloo", **layout), env, seed=0)
    dist.barrier()
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    (chunk,) = build_from_hf(source, **layout)
    if layout.get("pipeline", 1) > 1:
        ours = _two_stage_log_probs(chunk, tokens)
        last = ps.is_pipeline_last_stage()
    else:
        ours, last = (
            megatron_log_probs(chunk, tokens, ps.get_tensor_model_parallel_group()),
            True,
        )
    err = (ours - hf_log_probs(hf, tokens)).abs().max() * last
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    errors = {f"{name}_logprobs": err.item()}
    export_hf_checkpoint([chunk], scratch / f"{name}_out", source)
    if env.rank == 0:
        errors[f"{name}_export"] = export_mismatch(source, scratch / f"{name}_out")
    ps.destroy_model_parallel()
    return errors


def _main(argv: list[str]) -> None:
    from megatron_dapo.mcore.parallel import DistributedEnv, destroy_parallel

    env = DistributedEnv.from_environ()
    errors = {}
    if argv[0] == "checkpoint":
        source, tensor, scratch, out_path = Path(argv[1]), int(argv[2]), Path(argv[3]), argv[4]
        prompt, response = chat_turn(source)
        tokens, layout = torch.tensor([prompt + response]), {"tensor": tensor}
        errors = _sharded_errors(f"tensor{tensor}", source, layout, tokens, scratch, env)
    else:
        scratch, out_path = Path(argv[1]), argv[2]
        for model_type, layout in SHARDED:
            name = f"{model_type}_" + "_".join(f"{k}{v}" for k, v in layout.items())
            source = scratch / f"{name}_src"
            if env.rank == 0:
                make_hf_checkpoint(model_type, source)
            errors.update(_sharded_errors(name, source, layout, tokens_for_test(), scratch, env))
    if env.rank == 0:
        Path(out_path).write_text(json.dumps(errors))
    destroy_parallel()


if __name__ == "__main__":
    _main(sys.argv[1:])
