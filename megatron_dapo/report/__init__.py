"""Reporting a run: the trainer's Prometheus series (`prometheus`) and the per-step summary
(`step_report`: metrics from the batch, the queue and the optimizer steps; the step line, the
progress bar and `metrics.jsonl`) and the supervised warm-up's (`sft_report`).

May import: prometheus-client, tqdm, torch, `megatron_dapo.config`, `megatron_dapo.mcore` (the
optimizer step's metrics) and `pipeline`.
"""
