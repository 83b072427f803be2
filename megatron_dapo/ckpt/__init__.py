"""Checkpoints of a run: Megatron distributed checkpoints of model, optimizer and LR schedule
(`dist_checkpoint`) and run checkpoints that add every rank's RNG states and the data plane's
state for exact resume (`run_checkpoint`).

May import: Megatron-Core, torch, `megatron_dapo.config`, `megatron_dapo.mcore` and
`pipeline.parent_death` (the checkpoint writer's processes die with their rank).
"""
