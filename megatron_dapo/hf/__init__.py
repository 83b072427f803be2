"""HF-format checkpoints: name and layout mappings between HF and Megatron-Core parameters
(`mappings`), import into and export from sharded Megatron-Core models and the weight stream
to the fleet (`convert`), and random initial checkpoints for runs that start from scratch
(`initial_checkpoint`).

May import: torch, safetensors, transformers, Megatron-Core's parallel state,
`megatron_dapo.config`, `pipeline.config`, `pipeline.tokenizer` and `pipeline.weight_sync` (the
buckets and the stage sender).
"""
