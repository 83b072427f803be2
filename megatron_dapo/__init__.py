"""megatron-dapo training plane: Megatron-Core policy, DAPO loss, optimizer, weight sync."""
