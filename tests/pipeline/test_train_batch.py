"""TrainBatch: validation, derived views, selection and the on-disk round trip, with and
without routed experts (MoE routing replay)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.train_batch import SCHEMA_VERSION, ExpertRouting, TrainBatch, unrouted


def _batch(**changes) -> TrainBatch:
    # sample 0: prompt [5, 6], response [7, 8, 9]; sample 1: prompt [1], response [2, 3]
    fields = dict(
        tokens=torch.tensor([5, 6, 7, 8, 9, 1, 2, 3]),
        sample_offsets=torch.tensor([0, 5, 8]),
        prompt_lengths=torch.tensor([2, 1]),
        rollout_log_probs=torch.tensor([0.0, 0.0, -0.1, -0.2, -0.3, 0.0, -0.4, -0.5]),
        loss_mask=torch.tensor([False, False, True, True, True, False, True, False]),
        advantages=torch.tensor([1.0, -1.0]),
        rewards=torch.tensor([1.0, -1.0]),
        group_ids=torch.tensor([0, 0]),
        weight_versions=torch.tensor([3, 3]),
        metadata=({"finish_reason": "stop"}, {"finish_reason": "length"}),
    )
    return TrainBatch(**{**fields, **changes})


ROUTING = ExpertRouting(num_layers=2, topk=2, num_experts=4)


def _routes() -> torch.Tensor:
    """[8, 2, 2] uint8: token p routed to experts (p % 4, (p + 1) % 4) at layer 0, reversed at
    layer 1."""
    first = torch.arange(8) % 4
    pair = torch.stack([first, (first + 1) % 4], dim=1)
    return torch.stack([pair, pair.flip(1)], dim=1).to(torch.uint8)


def test_derived_views() -> None:
    batch = _batch()
    assert batch.sample_ids().tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert batch.prompt_token_mask().tolist() == [1, 1, 0, 0, 0, 1, 0, 0]
    assert batch.response_lengths().tolist() == [3, 2]


def test_select_reorders_samples_with_their_tokens() -> None:
    picked = _batch().select(torch.tensor([1, 0]))
    assert picked.tokens.tolist() == [1, 2, 3, 5, 6, 7, 8, 9]
    assert picked.sample_offsets.tolist() == [0, 3, 8]
    assert picked.rollout_log_probs.tolist() == pytest.approx(
        [0, -0.4, -0.5, 0, 0, -0.1, -0.2, -0.3]
    )
    assert picked.advantages.tolist() == [-1.0, 1.0]
    assert picked.metadata[0]["finish_reason"] == "length"
    assert _batch().select(torch.tensor([], dtype=torch.int64)).num_samples == 0


def test_save_load_round_trip(tmp_path: Path) -> None:
    batch = _batch()
    batch.save(tmp_path / "b.pt")
    loaded = TrainBatch.load(tmp_path / "b.pt")
    for name in ("tokens", "sample_offsets", "rollout_log_probs", "loss_mask", "advantages"):
        assert torch.equal(getattr(loaded, name), getattr(batch, name))
    assert loaded.metadata == batch.metadata


def test_load_refuses_another_schema_version(tmp_path: Path) -> None:
    torch.save({"schema_version": 99, "batch": {}}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match=f"schema version 99, expected {SCHEMA_VERSION}"):
        TrainBatch.load(tmp_path / "b.pt")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tokens": torch.tensor([1.0])}, "tokens must be a 1-D torch.int64"),
        ({"sample_offsets": torch.tensor([0, 5, 7])}, "sample_offsets must run from 0 to 8"),
        ({"prompt_lengths": torch.tensor([5, 1])}, "at least one response token"),
        ({"advantages": torch.tensor([1.0])}, "advantages must have 2 entries"),
        (
            {"loss_mask": torch.tensor([True, False, True, True, True, False, True, False])},
            "False at prompt tokens",
        ),
        (
            {"rollout_log_probs": torch.tensor([0.0, 0.0, -0.1, float("nan"), -0.3, 0, -0.4, 0])},
            "rollout_log_probs has 1 non-finite value",
        ),
        ({"advantages": torch.tensor([1.0, float("inf")])}, "advantages has 1 non-finite"),
    ],
)
def test_invalid_batches_are_rejected(change: dict, message: str) -> None:
    fields = {name: getattr(_batch(), name) for name in TrainBatch.__dataclass_fields__}
    with pytest.raises(ValueError, match=message):
        TrainBatch(**{**fields, **change})


def test_routes_travel_with_their_tokens_through_select_and_save(tmp_path: Path) -> None:
    batch = _batch(routed_experts=_routes())
    picked = batch.select(torch.tensor([1, 0]))
    assert torch.equal(picked.routed_experts, torch.cat([_routes()[5:], _routes()[:5]]))
    assert _batch().select(torch.tensor([1])).routed_experts is None
    batch.save(tmp_path / "b.pt")
    loaded = TrainBatch.load(tmp_path / "b.pt")
    assert loaded.routed_experts.dtype == torch.uint8
    assert torch.equal(loaded.routed_experts, batch.routed_experts)
    _batch().save(tmp_path / "plain.pt")
    assert TrainBatch.load(tmp_path / "plain.pt").routed_experts is None


def test_routing_dtype_memory_and_filler() -> None:
    assert ROUTING.dtype == torch.uint8 and ROUTING.bytes_per_token == 4
    assert ExpertRouting(48, 8, 128).bytes_per_token == 384
    assert ExpertRouting(61, 8, 256).dtype == torch.uint8
    assert ExpertRouting(4, 2, 257).dtype == torch.int16
    with pytest.raises(ValueError, match="do not fit"):
        _ = ExpertRouting(4, 2, 2**15 + 1).dtype
    filler = unrouted(3, _routes())
    assert filler.shape == (3, 2, 2) and filler.dtype == torch.uint8
    assert filler.tolist() == [[[0, 1], [0, 1]]] * 3


def test_routing_check_names_the_mismatch() -> None:
    ROUTING.check(_routes())
    with pytest.raises(ValueError, match="carries no routed experts"):
        ROUTING.check(None)
    with pytest.raises(ValueError, match=r"\[2, 2\] \(layers, top-k\) do not fit the model's 3"):
        ExpertRouting(3, 2, 4).check(_routes())
    with pytest.raises(ValueError, match="expert id 3 exceeds the model's 3 experts"):
        ExpertRouting(2, 2, 3).check(_routes())


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        (_routes().to(torch.int64), "routed_experts must be a \\[8, layers, top-k\\]"),
        (_routes()[:7], "routed_experts must be a \\[8, layers, top-k\\]"),
        (_routes()[:, 0], "routed_experts must be a \\[8, layers, top-k\\]"),
        (-_routes().to(torch.int16), "negative expert ids"),
        (torch.zeros(8, 2, 2, dtype=torch.uint8), "routes token 0 to one expert twice at layer 0"),
    ],
)
def test_invalid_routes_are_rejected(routes: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _batch(routed_experts=routes)
