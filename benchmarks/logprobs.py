"""Naive full-vocab log-probs/entropy vs the chunked fused path: time and peak memory.

Both variants start from the last hidden states `[T, H]` and the output weight `[V, H]`
(requires grad) and run forward + backward of `sum(a * log p_target + b * entropy)`:

* naive: `logits = hidden @ weight.T`, `log_softmax`, gather, entropy from the full `[T, V]`
  softmax (what a policy step does without vocab-parallel care);
* fused: `megatron_dapo.mcore.logprobs.fused_linear_log_probs_and_entropy` (chunks of tokens, the
  logits recomputed per chunk in backward, never `[T, V]`).

Each (variant, shape) runs in a fresh subprocess, so the peak resident set (`ru_maxrss`) is
that variant's alone; the reported peak is `ru_maxrss` minus the RSS once the inputs exist, i.e.
everything the forward + backward allocates (including the `[V, H]` weight gradient that both
variants produce). Time is the best of `--repeats` forward + backward passes.

    PYTHONPATH=. python benchmarks/logprobs.py            # the issue's two shapes
    PYTHONPATH=. python benchmarks/logprobs.py --quick    # small shapes, seconds
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Shape:
    tokens: int
    vocab: int
    hidden: int


FULL_SHAPES = (Shape(4096, 32768, 1024), Shape(2048, 151936, 896))
QUICK_SHAPES = (Shape(2048, 4096, 64),)


def _rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _naive(hidden, weight, targets, a, b, chunk_size):
    logits = (hidden @ weight.t()).float()
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    (a * logp + b * entropy).sum().backward()


def _fused(hidden, weight, targets, a, b, chunk_size):
    from megatron_dapo.mcore.logprobs import fused_linear_log_probs_and_entropy

    logp, entropy = fused_linear_log_probs_and_entropy(
        hidden, weight, targets, chunk_size=chunk_size
    )
    (a * logp + b * entropy).sum().backward()


def run_worker(variant: str, shape: Shape, chunk_size: int, repeats: int) -> dict:
    """One variant in this process: returns best time (s) and peak memory above inputs (MiB)."""
    if variant == "fused":  # imports Megatron-Core: before the baseline, not inside the peak
        importlib.import_module("megatron_dapo.mcore.logprobs")
    step = _fused if variant == "fused" else _naive
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(shape.tokens, shape.hidden, generator=g).requires_grad_()
    weight = (torch.randn(shape.vocab, shape.hidden, generator=g) * 0.05).requires_grad_()
    targets = torch.randint(0, shape.vocab, (shape.tokens,), generator=g)
    a, b = torch.randn(shape.tokens, generator=g), torch.randn(shape.tokens, generator=g)
    baseline = _rss_mb()
    times = []
    for _ in range(repeats):
        hidden.grad = weight.grad = None
        start = time.perf_counter()
        step(hidden, weight, targets, a, b, chunk_size)
        times.append(time.perf_counter() - start)
    return {"time_s": min(times), "peak_mb": _peak_rss_mb() - baseline}


def _spawn(variant: str, shape: Shape, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--shape",
        f"{shape.tokens},{shape.vocab},{shape.hidden}",
        "--chunk-size",
        str(args.chunk_size),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
    ]
    repo = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])),
    }
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", choices=("naive", "fused"), help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        shape = Shape(*(int(x) for x in args.shape.split(",")))
        print(json.dumps(run_worker(args.worker, shape, args.chunk_size, args.repeats)))
        return []
    rows = []
    header = (
        f"{'T':>6} {'V':>7} {'H':>5} | {'naive s':>8} {'fused s':>8} {'time x':>7} | "
        f"{'naive MiB':>9} {'fused MiB':>9} {'mem x':>6}"
    )
    print(f"chunk_size={args.chunk_size} threads={args.threads} repeats={args.repeats}")
    print(header)
    print("-" * len(header))
    for shape in QUICK_SHAPES if args.quick else FULL_SHAPES:
        naive, fused = _spawn("naive", shape, args), _spawn("fused", shape, args)
        row = {
            "shape": shape.__dict__,
            "naive": naive,
            "fused": fused,
            "time_ratio": fused["time_s"] / naive["time_s"],
            "mem_ratio": fused["peak_mb"] / naive["peak_mb"],
        }
        rows.append(row)
        print(
            f"{shape.tokens:>6} {shape.vocab:>7} {shape.hidden:>5} | "
            f"{naive['time_s']:>8.2f} {fused['time_s']:>8.2f} {row['time_ratio']:>7.2f} | "
            f"{naive['peak_mb']:>9.0f} {fused['peak_mb']:>9.0f} {row['mem_ratio']:>6.2f}",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
