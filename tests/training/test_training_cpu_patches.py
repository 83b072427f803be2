"""The CPU patches: applied once without CUDA, and each one's code path is run by a test.

Removing any single patch makes the named test fail on this machine (checked by running the
parity worker with each patch left out, see the note of issue 3); this module keeps the list of
patches and the tests that exercise them in step.
"""

from __future__ import annotations

import importlib

import pytest
import test_training_parity
import torch

from megatron_dapo.mcore.cpu_patches import CPU_PATCHES, apply_cpu_patches

# patch -> (test module, test function, parametrisation or None): a test whose code path needs it
COVERED_BY = {
    "current_device": (
        "test_training_policy_step",
        "test_lr_warms_up_linearly_from_zero_over_mini_batches",
        None,
    ),
    "streams": (
        "test_training_policy_step",
        "test_moe_step_reports_aux_loss_and_expert_load",
        None,
    ),
    "tensor_cuda": (
        "test_training_parity",
        "test_first_step_matches_single_rank",
        "dense_pp2_tied",
    ),
    "rng_tracker": (
        "test_training_policy_step",
        "test_lr_warms_up_linearly_from_zero_over_mini_batches",
        None,
    ),
    "cuda_literals": (
        "test_training_policy_step",
        "test_lr_warms_up_linearly_from_zero_over_mini_batches",
        None,
    ),
    "te_general_gemm": (
        "test_training_policy_step",
        "test_moe_step_reports_aux_loss_and_expert_load",
        None,
    ),
    "torch_norm_sequence_parallel": (
        "test_training_parity",
        "test_first_step_matches_single_rank",
        "dense_tp2_sp",
    ),
    "split_sizes_to_numpy": (
        "test_training_parity",
        "test_first_step_matches_single_rank",
        "moe_ep2_dp2",
    ),
    "uneven_all_gather": (
        "test_training_parity",
        "test_first_step_matches_single_rank",
        "moe_tp2_ep2_etp2_sp",
    ),
    "tensor_type_names": (
        "test_training_policy_step",
        "test_lr_warms_up_linearly_from_zero_over_mini_batches",
        None,
    ),
    "distrib_optimizer_state_load": (
        "test_training_parity",
        "test_resumed_step_matches_continued_step",
        "dense_dp2",
    ),
}


def test_every_patch_has_a_reason_and_a_covering_test() -> None:
    assert {patch.name for patch in CPU_PATCHES} == set(COVERED_BY)
    for patch in CPU_PATCHES:
        assert len(patch.reason) > 40, patch.name
        module_name, function, layout = COVERED_BY[patch.name]
        assert callable(getattr(importlib.import_module(module_name), function))
        assert layout is None or layout in test_training_parity.LAYOUTS


@pytest.mark.skipif(torch.cuda.is_available(), reason="the patches apply only without CUDA")
def test_patches_apply_once_without_cuda() -> None:
    assert apply_cpu_patches()
    patched_type = torch.Tensor.type
    assert apply_cpu_patches()  # idempotent: nothing is wrapped twice
    assert torch.Tensor.type is patched_type
    assert torch.cuda.current_device() == "cpu"
    assert torch.zeros(2).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(2).type(torch.float64).dtype == torch.float64  # casts are untouched
