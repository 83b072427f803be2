"""Trainer side of the weight sync: time and peak memory, old path vs streamed buckets.

    python benchmarks/weight_sync.py            # launches itself on 2 ranks (torchrun, TP2)

For random-init Llama models of `SIZES` (fp32, TP2 on 2 gloo ranks), rank 0 measures:

    old       the pre-bucket path (`gather_hf_state_dict`, kept here only): every TP-rank-0
              clones its stage in HF layout and `gather_object`s it to global rank 0
    buckets   `hf_weight_buckets` (what every mode streams) for each of `BUCKETS_MB`, the
              buckets handed to a sender that drops them

Columns: model size (MiB of fp32 parameters), path, bucket MiB, seconds (median of `REPEATS`),
and the peak extra resident memory of rank 0 over the call (RSS sampled every 1 ms, minus the
RSS before it; MiB). The server's load is not included: it is the same for both paths per
byte, but the old path sent everything in one call (SGLang allocates all received tensors
before loading, a second full copy), the new one a bucket per call.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {  # name -> HF config fields of a Llama (vocab 32000, 64-dim heads, 2 KV heads)
    "small": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4},
    "medium": {"hidden_size": 768, "intermediate_size": 2304, "num_hidden_layers": 6},
    "large": {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 8},
}
BUCKETS_MB = (8, 64)
REPEATS = 2


@torch.no_grad()
def gather_hf_state_dict(chunks: list[torch.nn.Module], model_type: str) -> dict:
    """The old path, as it was before the streamed buckets (megatron_dapo/hf/convert.py)."""
    from megatron_dapo.hf.convert import (
        _attention_shape,
        _global_parameters,
        _rule,
        _ShardGroup,
        _unshard,
        chunk_rules,
    )
    from megatron_dapo.hf.mappings import to_hf

    local: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        rules, shape = chunk_rules(chunk, model_type), _attention_shape(chunk)
        for template, _, layer, expert, param in _global_parameters(chunk):
            if chunk.share_embeddings_and_output_weights and template == "output_layer.weight":
                continue
            rule, group = _rule(rules, template), _ShardGroup(expert >= 0)
            full = _unshard(param, rule, group)
            if group.rank == 0:
                tensors = to_hf(rule, full, shape)
                for hf_name, tensor in zip(rule.hf, tensors, strict=True):
                    local[hf_name.format(layer=layer, expert=expert)] = tensor.clone()
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, gathered, dst=0)
    if dist.get_rank() != 0:
        return {}
    merged: dict[str, torch.Tensor] = {}
    for part in gathered:
        for hf_name, tensor in part.items():
            merged.setdefault(hf_name, tensor)
    return merged


def _cases(chunks: list[torch.nn.Module]) -> list[tuple[str, str, Callable[[], object]]]:
    """(path, bucket MiB, call) of every measured path over the model `chunks`."""
    from megatron_dapo.hf.convert import hf_weight_buckets

    def buckets(mb: int) -> int:
        return sum(1 for _ in hf_weight_buckets(chunks, "llama", mb * 2**20))

    cases: list[tuple[str, str, Callable[[], object]]] = [
        ("old", "-", lambda: gather_hf_state_dict(chunks, "llama"))
    ]
    return cases + [("buckets", str(mb), lambda mb=mb: buckets(mb)) for mb in BUCKETS_MB]


def measured(call: Callable[[], object]) -> tuple[float, float]:
    """(seconds, peak extra RSS in MiB) of `call()` in this process."""
    process = psutil.Process()
    before = process.memory_info().rss
    peak, done = [before], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    del result
    return seconds, (peak[0] - before) / 2**20


def worker(scratch: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_dapo.config.schema import ParallelismConfig
    from megatron_dapo.mcore.parallel import DistributedEnv, destroy_parallel, initialize_parallel
    from tests.training.hf_worker import build_from_hf

    env = DistributedEnv.from_environ()
    initialize_parallel(ParallelismConfig(backend="gloo", tensor=2), env, seed=0)
    rows = []
    for name, fields in SIZES.items():
        source = scratch / name
        if env.rank == 0:
            config = AutoConfig.for_model(
                "llama",
                vocab_size=32000,
                num_attention_heads=fields["hidden_size"] // 64,
                num_key_value_heads=2,
                **fields,
            )
            AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(source)
        dist.barrier()
        chunks = build_from_hf(source, tensor=2)
        size_mb = 2 * sum(p.numel() * 4 for c in chunks for p in c.parameters()) / 2**20
        for path, bucket, call in _cases(chunks):
            runs = []
            for _ in range(REPEATS):
                dist.barrier()
                runs.append(measured(call))
            rows.append(
                (
                    f"{size_mb:.0f}",
                    path,
                    bucket,
                    statistics.median(s for s, _ in runs),
                    max(m for _, m in runs),
                )
            )
    if env.rank == 0:
        print(f"{'model MiB':>9} | {'path':<7} | {'bucket MiB':>10} | {'seconds':>7} | ", end="")
        print("peak extra MiB")
        print("-" * 60)
        for size, path, bucket, seconds, peak in rows:
            print(f"{size:>9} | {path:<7} | {bucket:>10} | {seconds:>7.2f} | {peak:>14.0f}")
    destroy_parallel()


def main() -> None:
    if "RANK" in os.environ:
        worker(Path(sys.argv[1]))
        return
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
        ]
        subprocess.run([*command, __file__, scratch], env=env, check=True)


if __name__ == "__main__":
    main()
