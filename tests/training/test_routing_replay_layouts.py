"""Routing replay in every parallel layout (`routing_replay_worker.py`, one 2-rank torchrun
launch): TP2 with sequence parallelism (each TP rank's router replays its slice of the row),
EP2 (with DP2), PP2 (1F1B, rows padded to one length) and PP2 x VPP2 (interleaved), each
without and with full activation recompute. Every router call applies the routes of one of
its rank's micro-batches, each micro-batch once per pass; recompute replays the right
micro-batch's routes, so it leaves loss and gradient norm unchanged (checked to fail in both
PP layouts when the routers are not switched to the recompute queue). 40 s on 2 cores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launch_helpers import run_torchrun
from routing_replay_worker import SCENARIOS

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
@pytest.mark.multirank
def test_routes_are_replayed_in_every_layout_and_under_recompute(tmp_path: Path) -> None:
    out = tmp_path / "replay.json"
    run_torchrun(HERE / "routing_replay_worker.py", str(tmp_path), str(out))
    results = json.loads(out.read_text())
    assert set(results) == set(SCENARIOS)
    for name, runs in results.items():
        for recompute, result in runs.items():
            assert result["calls"] > 0 and result["unmatched_calls"] == 0, (name, recompute, result)
            assert result["micro_batch_layers_not_routed_once_per_pass"] == 0, (name, recompute)
        plain, recomputed = runs["none"], runs["full"]
        assert recomputed["calls"] > plain["calls"], name  # the recompute re-ran the routers
        assert recomputed["loss"] == pytest.approx(plain["loss"], rel=1e-6), name
        assert recomputed["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5), name
