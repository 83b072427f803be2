"""Per-response sampling seeds derived from a response's place, so generation is reproducible on
servers started with `--enable-deterministic-inference` (which seed seedless requests alike).

The dynamic-sampling queue's deterministic mode seeds each response from
(`rollout.sampling_seed`, its group's position in the prompt stream, its index in the group);
the evaluator from (`eval.sampling_seed`, the dataset's `seed`, the prompt's position, the
sample's index). Both are `response_seed` of such a key.
"""

from __future__ import annotations

SEED_MASK = 2**63 - 1
"""Sampling seeds are non-negative int64."""


def response_seed(*key: int) -> int:
    """The sampling seed of the response at `key` (integers): the same in every process and
    run (Python hashes integer tuples without `PYTHONHASHSEED`'s salt), in [0, 2**63)."""
    return hash(key) & SEED_MASK
