"""Streamed, bucketed weight sync is the identity on a real SGLang server, in every trainer
layout (TP2, PP2, EP2 on 2 ranks) and every mode (`distributed` over a gloo update group,
`disk` shards, `tensor` flattened buckets), with the sending ranks' memory bounded by the
bucket.

One CPU server of a tiny Qwen3-MoE checkpoint (4 layers, 4 experts) per server TP size (1,
and 2: two scheduler ranks, each pinned to one core with `SGLANG_CPU_OMP_THREADS_BIND`, which
SGLang's CPU backend asks for beyond one rank per NUMA node; its update groups have 3 ranks)
serves every layout and mode; `weight_stream_worker.py` streams the weights the trainer
loaded from that checkpoint (so its prefill log-probs must stay the same, bit for bit) and a
control with the final norm scaled by 1% (which must change them, and the next sync restore
them). Buckets of 16 KiB, far below each sender's shards (110-150 KiB), so every stage
streams many buckets and the bound (16 KiB + 2 x 12 KiB: the TP2 embedding's gathered shards
and their concatenation) is well below what a whole-stage gather holds. Measured on 2 cores:
about a minute per server TP size, most of it the server's start; the two-server case (rank
offsets 1 and 2) is `tests/pipeline/test_sglang_client.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hf_worker import make_hf_checkpoint
from launch_helpers import run_torchrun
from test_weight_sync_sglang import SERVER
from weight_stream_worker import LAYOUTS, MODES

from pipeline.fleet import EmbeddedFleetOptions, RolloutFleet

pytestmark = [pytest.mark.slow, pytest.mark.multirank, pytest.mark.server]

HERE = Path(__file__).resolve().parent
BUCKET_BYTES = 16 * 2**10


@pytest.mark.parametrize("server_tp", [1, 2])
def test_streamed_sync_keeps_server_log_probs_in_every_layout_and_mode(
    server_tp: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, out = tmp_path / "source", tmp_path / "result.json"
    make_hf_checkpoint("qwen3_moe", source, num_hidden_layers=4)
    options = EmbeddedFleetOptions(str(source), tmp_path / "logs", start_timeout_s=240.0)
    server = SERVER
    if server_tp > 1:
        monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", "|".join(map(str, range(server_tp))))
        server = SERVER.model_copy(update={"server_args": (*SERVER.server_args, "--tp", "2")})
    with RolloutFleet(server, options) as fleet:
        args = (str(source), fleet.worker_urls[0], str(BUCKET_BYTES), str(tmp_path), str(out))
        run_torchrun(HERE / "weight_stream_worker.py", *args, timeout=900)
    result = json.loads(out.read_text())
    before = result["before"]
    synced = [(s["layout"], s["mode"]) for s in result["syncs"] if not s["perturbed"]]
    assert {(layout, mode) for layout in LAYOUTS for mode in MODES} <= set(synced)
    for sync in result["syncs"]:
        case = (sync["layout"], sync["mode"], sync["perturbed"])
        assert sync["served_version"] == sync["version"], case
        if sync["perturbed"]:
            pairs = zip(sum(before, []), sum(sync["scores"], []), strict=True)
            assert max(abs(a - b) for a, b in pairs) > 1e-3, case
        else:
            assert sync["scores"] == before, case

    peaks = [p for rank in (0, 1) for p in _peaks(out, rank)]
    assert {p["layout"] for p in peaks} == set(LAYOUTS)
    for peak in peaks:
        assert 0 < peak["peak"] <= peak["bound"], peak
        assert peak["bound"] < peak["model_bytes"], peak  # a whole-stage gather would not fit


def _peaks(out: Path, rank: int) -> list[dict]:
    path = Path(f"{out}.rank{rank}")
    return json.loads(path.read_text()) if path.exists() else []
