"""The pure RL algorithm: functions of tensors, no Megatron, no HTTP, no run config.

Policy losses per token (`policy_loss`), their aggregation with global normalisers
(`aggregation`), KL estimators (`kl`), the eps_high schedule (`eps_schedule`) and the policy
objective that combines them with typed, reducible statistics (`objective`). Each family is a
`pipeline.registry.Registry` selected by name. The supervised warm-up's cross-entropy (`sft`)
uses the same global normalisers.

May import: torch, the standard library and `pipeline.registry`.
"""
