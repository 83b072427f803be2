"""megatron-dapo's training plane: DAPO policy training on Megatron-Core.

Sub-packages by role (each `__init__` says what it holds and what it may import; the directions
are enforced by `tests/test_import_boundaries.py`):

    algo/     the pure algorithm: policy losses, aggregation, KL, eps schedule, the objective
    config/   the `RunConfig` schema and its YAML loading
    mcore/    Megatron-Core: CPU patches, parallel state, model, micro-batches, log-probs, step
    hf/       HF checkpoints: name mappings, import / export, random initial checkpoints
    ckpt/     distributed checkpoints and run checkpoints (RNG, data-plane state)
    report/   the step's metrics: Prometheus exporter, step line, `metrics.jsonl`

`cli.py` is the command line; `train.py` is the training loop. The data plane (`pipeline/`) never
imports this package.
"""
