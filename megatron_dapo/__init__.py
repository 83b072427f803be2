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

Importing it silences, on machines without CUDA, the start-up notices that do not apply there
(Megatron-Core's "Transformer Engine and Apex are not installed" fallbacks, torch's CUDA_HOME
line): they would fill the first screen of every run and teach users to ignore warnings.
"""

import logging
import warnings

import torch

_NOT_APPLICABLE_WITHOUT_CUDA = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
)
"""Messages of Megatron-Core's import-time UserWarnings about GPU-only libraries."""


class _NoCudaHomeNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


if not torch.cuda.is_available():
    for message in _NOT_APPLICABLE_WITHOUT_CUDA:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    logging.getLogger("torch.utils.cpp_extension").addFilter(_NoCudaHomeNotice())
