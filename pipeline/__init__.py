"""megatron-dapo data plane: prompts, rollout fleet, rewards, dynamic sampling (no Megatron)."""
