"""TrainBatch: validation, derived views, selection and the on-disk round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.train_batch import TrainBatch


def _batch() -> TrainBatch:
    # sample 0: prompt [5, 6], response [7, 8, 9]; sample 1: prompt [1], response [2, 3]
    return TrainBatch(
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
    with pytest.raises(ValueError, match="schema version 99, expected 2"):
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
