"""HF-format checkpoints: name and layout mappings between HF and Megatron-Core parameters
(`mappings`), import into and export from sharded Megatron-Core models (`convert`), and random
initial checkpoints for runs that start from scratch (`initial_checkpoint`).

May import: torch, safetensors, transformers, Megatron-Core's parallel state,
`megatron_dapo.config` and `pipeline.tokenizer`.
"""
