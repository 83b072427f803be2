"""Megatron-Core plumbing of the policy: CPU patches (`cpu_patches`), parallel state
(`parallel`), the GPT model from the run config (`model`), packing into micro-batches
(`micro_batches`), vocab-parallel log-probs and entropy (`logprobs`), the optimizer step
(`policy_step`) and optional tensor statistics (`tensor_inspect`).

May import: Megatron-Core, torch, `megatron_dapo.algo`, `megatron_dapo.config`,
`megatron_dapo.hf` (the policy starts from an HF checkpoint) and `pipeline.train_batch` (the
batch contract).
"""
