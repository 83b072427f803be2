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

Importing it silences notices that say nothing about the run, which would otherwise fill the
first screen of every run and teach users to ignore warnings: on machines without CUDA,
Megatron-Core's "Transformer Engine and Apex are not installed" fallbacks and torch's CUDA_HOME
line; everywhere, torch's note when Megatron-Core's optimizer zeroes the `.grad` of its fp32
parameter-shard views (non-leaf tensors whose `.grad` is always None; the gradients live in the
DDP buffers, which are zeroed separately).
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


warnings.filterwarnings(
    "ignore",
    message=r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
    category=UserWarning,
    module=r"megatron\.core\.optimizer\.optimizer",
)
if not torch.cuda.is_available():
    for message in _NOT_APPLICABLE_WITHOUT_CUDA:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    logging.getLogger("torch.utils.cpp_extension").addFilter(_NoCudaHomeNotice())
