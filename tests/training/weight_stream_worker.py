"""torchrun worker (2 ranks) of `test_weight_stream_sglang.py`: the trainer's weights streamed
in buckets (`stream_weights` + `pipeline.weight_sync`) leave a real SGLang server's log-probs
exactly as they were on the checkpoint the trainer started from, in every layout and mode.

    torchrun --nproc_per_node=2 weight_stream_worker.py SOURCE SERVER_URL BUCKET_BYTES SCRATCH OUT

SOURCE is the HF checkpoint the server was started on. For each layout of `LAYOUTS` the ranks
load SOURCE into Megatron-Core chunks, then for each mode of `MODES` stream the (unchanged)
weights to the server as a new version; rank 0 runs the data plane's `WeightSync` on an asyncio
loop in a thread meanwhile, then scores `SEQUENCES` (prefill log-probs). Once per layout a
control syncs weights whose final norm was scaled by `CONTROL_SCALE`, then the original ones.
Every stage sender records the peak bytes of tensor storage allocated while it streamed
(`LiveTensorBytes`) and the bound `bucket + 2 x largest unit` (a unit: one parameter gathered
over TP, and for experts over EP). Rank 0 writes `{"before": ..., "syncs": [...]}` to OUT,
every sender its peaks to `OUT.rank<R>`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from pathlib import Path

import aiohttp
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hf_worker import build_from_hf, tokens_for_test  # noqa: E402
from live_tensor_bytes import LiveTensorBytes  # noqa: E402

from megatron_dapo.config.schema import ParallelismConfig  # noqa: E402
from megatron_dapo.hf.convert import (  # noqa: E402
    SyncRole,
    _global_parameters,
    _rule,
    chunk_rules,
    hf_model_type,
    stream_weights,
)
from megatron_dapo.mcore.parallel import (  # noqa: E402
    DistributedEnv,
    destroy_parallel,
    initialize_parallel,
)
from pipeline.rollout_client import RolloutClient  # noqa: E402
from pipeline.sglang_client import SGLangServerClient  # noqa: E402
from pipeline.weight_sync import WeightSender, WeightSync  # noqa: E402

LAYOUTS = {
    "tp2": {"tensor": 2},
    "pp2": {"pipeline": 2},
    "ep2": {"expert": 2, "expert_tensor": 1},
}
MODES = ("distributed", "disk", "tensor")
CONTROL_SCALE = 1.01
SEQUENCES = tokens_for_test().tolist()  # [2, 12] random ids


class FleetSide:
    """Rank 0's data plane stand-in: a `WeightSync` over one server, on a loop in a thread."""

    def __init__(self, url: str, store: dist.Store, num_stages: int, run_dir: Path, source: Path):
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        self.server, self.client = self.run(self._open(url))
        self.syncs = {
            mode: WeightSync(mode, self.client, store.clone(), num_stages, run_dir, source)
            for mode in MODES
        }

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def start(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    async def _open(self, url: str) -> tuple[SGLangServerClient, RolloutClient]:
        self.session = aiohttp.ClientSession()
        server = SGLangServerClient(url, self.session, timeout_s=300.0)
        return server, RolloutClient([server])

    async def _scores(self) -> list[list[float]]:
        return [list(await self.server.sequence_logprobs(s)) for s in SEQUENCES]

    def scores(self) -> list[list[float]]:
        return self.run(self._scores())

    def close(self) -> None:
        for sync in self.syncs.values():
            self.run(sync.close())
        self.run(self.session.close())
        self._loop.call_soon_threadsafe(self._loop.stop)


def largest_unit(chunks: list[torch.nn.Module], model_type: str) -> int:
    """Bytes of the largest parameter as the sender holds it gathered (over TP or expert-TP
    when split, over EP for experts)."""
    from megatron.core import parallel_state as ps

    largest = 0
    for chunk in chunks:
        rules = chunk_rules(chunk, model_type)
        for template, _, _, expert, param in _global_parameters(chunk):
            size = param.numel() * param.element_size()
            if _rule(rules, template).split is not None:
                size *= (
                    ps.get_expert_tensor_parallel_world_size()
                    if expert >= 0
                    else ps.get_tensor_model_parallel_world_size()
                )
            if expert >= 0:
                size *= ps.get_expert_model_parallel_world_size()
            largest = max(largest, size)
    return largest


def main(source: Path, url: str, bucket_bytes: int, scratch: Path, out: Path) -> None:
    from megatron.core import parallel_state as ps

    env = DistributedEnv.from_environ()
    initialize_parallel(ParallelismConfig(backend="gloo"), env, seed=0)
    store = dist.distributed_c10d._get_default_store()
    model_type = hf_model_type(source)
    fleet = None
    if env.rank == 0:
        fleet = FleetSide(url, store, 1, scratch / "run", source)
        before = fleet.scores()
    syncs, peaks, version = [], [], 0
    for layout_index, (layout_name, layout) in enumerate(LAYOUTS.items()):
        ps.destroy_model_parallel()
        initialize_parallel(ParallelismConfig(backend="gloo", **layout), env, seed=0)
        chunks = build_from_hf(source, **layout)
        role = SyncRole.of_rank()
        num_stages = layout.get("pipeline", 1)
        run_dir = scratch / f"run_{layout_name}"
        if fleet is not None:
            for sync in fleet.syncs.values():
                fleet.run(sync.close())
                sync.num_stages, sync.run_dir = num_stages, run_dir
        senders = {m: WeightSender(m, store, role.stage, run_dir) for m in MODES}
        final_norm = [c.decoder.final_layernorm.weight for c in chunks if c.post_process]
        original = [w.detach().clone() for w in final_norm]
        control_mode = MODES[layout_index % len(MODES)]
        plan = [(m, False) for m in MODES] + [(control_mode, True), (control_mode, False)]
        for mode, perturbed in plan:
            with torch.no_grad():
                for weight, value in zip(final_norm, original, strict=True):
                    weight.copy_(value * CONTROL_SCALE if perturbed else value)
            version += 1
            pending = fleet.start(fleet.syncs[mode].sync(version)) if fleet else None
            with LiveTensorBytes() as live:
                stream_weights(
                    chunks,
                    model_type,
                    bucket_bytes,
                    senders[mode] if role.sender else None,
                    version,
                )
            if role.sender:
                peaks.append(
                    {
                        "layout": layout_name,
                        "mode": mode,
                        "peak": live.peak,
                        "bound": bucket_bytes + 2 * largest_unit(chunks, model_type),
                        "model_bytes": sum(
                            p.numel() * p.element_size() for c in chunks for p in c.parameters()
                        ),
                    }
                )
            if pending is not None:
                pending.result()
                syncs.append(
                    {
                        "layout": layout_name,
                        "mode": mode,
                        "perturbed": perturbed,
                        "scores": fleet.scores(),
                        "served_version": fleet.client.weight_version,
                        "version": version,
                    }
                )
            dist.barrier()
    if fleet is not None:
        fleet.close()
        out.write_text(json.dumps({"before": before, "syncs": syncs}))
    if peaks:
        Path(f"{out}.rank{env.rank}").write_text(json.dumps(peaks))
    destroy_parallel()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]))
