"""A tiny distributed job for the launcher tests: one gloo all_reduce, one JSON file per rank.

    torchrun ... allreduce_worker.py OUT_DIR [extra args ...]

Rank r contributes r + 1, so every rank must see world * (world + 1) / 2. Each rank writes
OUT_DIR/rank-<r>.json with its rank, world size, local rank, node, the reduced value and the
extra arguments it was given. With DAPO_TEST_FAIL_RANK=r, rank r exits with code 3 instead.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(out_dir: Path, extra: list[str]) -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if os.environ.get("DAPO_TEST_FAIL_RANK") == str(rank):
        print(f"rank {rank}: failing on purpose", flush=True)
        return 3
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    record = {
        "rank": rank,
        "world_size": world,
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "group_rank": int(os.environ["GROUP_RANK"]),
        "host": socket.gethostname(),
        "all_reduce_sum": value.item(),
        "extra_args": extra,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }
    (out_dir / f"rank-{rank}.json").write_text(json.dumps(record))
    print(f"rank {rank}/{world}: all_reduce sum {value.item()}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
