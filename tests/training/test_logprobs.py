"""Chunked vocab-parallel log-probs/entropy vs full-vocab torch references (fp64)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from launch_helpers import REPO, run_torchrun
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_dapo.mcore.logprobs import (
    fused_linear_log_probs,
    fused_linear_log_probs_and_entropy,
    vocab_parallel_entropy,
    vocab_parallel_log_probs,
    vocab_parallel_log_probs_and_entropy,
)

HERE = Path(__file__).resolve().parent


def _reference(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """Full-vocab log p(target) and entropy from torch's own log_softmax / Categorical."""
    scaled = logits / temperature
    logp = torch.log_softmax(scaled, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    entropy = torch.distributions.Categorical(logits=scaled).entropy()
    return logp, entropy


def _data(shape, vocab, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=g, dtype=dtype) * 3).requires_grad_()
    targets = torch.randint(0, vocab, shape, generator=g)
    weights = torch.randn(2, *shape, generator=g, dtype=dtype)
    return logits, targets, weights


@pytest.mark.parametrize("chunk_size", [1, 7, 30, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_values_and_grads_match_log_softmax(chunk_size, temperature):
    logits, targets, (a, b) = _data((3, 10), 41)
    logp, entropy = vocab_parallel_log_probs_and_entropy(
        logits, targets, chunk_size=chunk_size, temperature=temperature
    )
    ref_logp, ref_entropy = _reference(logits, targets, temperature)
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-12)
    torch.testing.assert_close(entropy, ref_entropy, rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad((a * logp + b * entropy).sum(), logits)
    (ref_grad,) = torch.autograd.grad((a * ref_logp + b * ref_entropy).sum(), logits)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)


def test_single_output_functions_and_their_grads():
    logits, targets, (a, b) = _data((25,), 17, seed=1)
    ref_logp, ref_entropy = _reference(logits, targets, 1.3)
    logp = vocab_parallel_log_probs(logits, targets, chunk_size=4, temperature=1.3)
    entropy = vocab_parallel_entropy(logits, chunk_size=6, temperature=1.3)
    for ours, ref, w in ((logp, ref_logp, a), (entropy, ref_entropy, b)):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
        (grad,) = torch.autograd.grad((w * ours).sum(), logits)
        (ref_grad,) = torch.autograd.grad((w * ref).sum(), logits, retain_graph=True)
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)


def test_gradcheck_both_outputs():
    logits, targets, _ = _data((5,), 6, seed=2)
    assert torch.autograd.gradcheck(
        lambda x: vocab_parallel_log_probs_and_entropy(x, targets, chunk_size=2, temperature=0.8),
        (logits,),
    )


def test_input_logits_are_not_modified():
    logits, targets, _ = _data((9,), 13, seed=3, dtype=torch.float32)
    before = logits.detach().clone()
    logp, entropy = vocab_parallel_log_probs_and_entropy(logits, targets, chunk_size=4)
    (logp + entropy).sum().backward()
    assert torch.equal(logits.detach(), before)


def test_bfloat16_logits_give_float32_log_probs_and_entropy():
    logits, targets, _ = _data((64,), 50, seed=4, dtype=torch.float32)
    low = logits.detach().bfloat16()
    logp, entropy = vocab_parallel_log_probs_and_entropy(low, targets, chunk_size=16)
    ref_logp, ref_entropy = _reference(low.double(), targets, 1.0)
    assert logp.dtype == entropy.dtype == torch.float32  # not rounded back to bf16
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-5, atol=1e-5)


def test_targets_shape_must_match():
    logits, targets, _ = _data((4,), 8)
    with pytest.raises(ValueError, match="targets shape"):
        vocab_parallel_log_probs(logits, targets[:3])


def _hidden_weight(tokens, hidden, vocab, seed=5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    a, b = torch.randn(2, tokens, generator=g, dtype=torch.float64)
    return h, w, targets, a, b


@pytest.mark.parametrize("chunk_size", [3, 64])
def test_fused_linear_matches_materialised_logits(chunk_size):
    h, w, targets, a, b = _hidden_weight(23, 8, 31)
    logp, entropy = fused_linear_log_probs_and_entropy(
        h, w, targets, chunk_size=chunk_size, temperature=0.7
    )
    ref_logp, ref_entropy = _reference(h @ w.t(), targets, 0.7)
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-12)
    torch.testing.assert_close(entropy, ref_entropy, rtol=0, atol=1e-12)
    grads = torch.autograd.grad((a * logp + b * entropy).sum(), (h, w))
    ref_grads = torch.autograd.grad((a * ref_logp + b * ref_entropy).sum(), (h, w))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11)


def test_fused_single_outputs_and_frozen_weight():
    h, w, targets, a, _ = _hidden_weight(11, 4, 9, seed=6)
    w_frozen = w.detach()
    logp = fused_linear_log_probs(h, w_frozen, targets, chunk_size=5)
    _, entropy = fused_linear_log_probs_and_entropy(h, w_frozen, None, chunk_size=5)
    ref_logp, ref_entropy = _reference(h @ w_frozen.t(), targets, 1.0)
    torch.testing.assert_close(entropy, ref_entropy, rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad((a * logp).sum(), h)
    (ref_grad,) = torch.autograd.grad((a * ref_logp).sum(), h)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)


def test_fused_bfloat16_weights_get_bfloat16_grads():
    h, w, targets, a, b = _hidden_weight(40, 16, 24, seed=8)
    h16, w16 = (x.detach().bfloat16().requires_grad_() for x in (h, w))
    logp, entropy = fused_linear_log_probs_and_entropy(h16, w16, targets, chunk_size=16)
    (a * logp + b * entropy).sum().backward()
    ref_logp, ref_entropy = _reference(h16.double() @ w16.double().t(), targets, 1.0)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=2**-7, atol=1e-2)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=2**-7, atol=1e-2)
    assert h16.grad.dtype == w16.grad.dtype == torch.bfloat16
    ref_grad_w = torch.autograd.grad((a * ref_logp + b * ref_entropy).sum(), w16)[0]
    torch.testing.assert_close(w16.grad.double(), ref_grad_w.double(), rtol=2**-6, atol=2e-2)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_fused_never_materialises_tokens_by_vocab():
    tokens, hidden, vocab, chunk = 256, 8, 512, 32
    h, w, targets, a, b = _hidden_weight(tokens, hidden, vocab, seed=7)
    with _LargestTensor() as fused:
        logp, entropy = fused_linear_log_probs_and_entropy(h, w, targets, chunk_size=chunk)
        (a * logp + b * entropy).sum().backward()
    with _LargestTensor() as naive:
        _reference(h @ w.t(), targets, 1.0)
    assert naive.max_numel == tokens * vocab
    assert fused.max_numel == max(chunk * vocab, vocab * hidden)


@pytest.mark.slow
@pytest.mark.multirank
def test_two_rank_tensor_parallel_matches_full_vocab(tmp_path):
    """One torchrun launch: both TP ranks' shards against the single-rank full-vocab result."""
    out = tmp_path / "errors.json"
    run_torchrun(HERE / "logprob_worker.py", str(out), timeout=300)
    errors = json.loads(out.read_text())
    assert set(errors) == {
        "logits_logp",
        "logits_entropy",
        "logits_grad",
        "fused_logp",
        "fused_entropy",
        "fused_grad_hidden",
        "fused_grad_weight",
        "fused_sp_grad_hidden",
    }
    for name, err in errors.items():
        assert err < 1e-10, f"{name}: max abs error {err}"


@pytest.mark.slow
def test_benchmark_runs_and_reports_ratios(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench", REPO / "benchmarks" / "logprobs.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench", bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    (row,) = bench.main(["--quick", "--repeats", "1"])
    # The targets (memory <= 0.25x, time <= 1x) are the benchmark's to report, not a test's.
    assert row["mem_ratio"] > 0 and row["time_ratio"] > 0
