"""Evaluate an HF checkpoint on the held-out sets of a run config (`megatron-dapo eval`): an
embedded SGLang fleet serving the checkpoint (`rollout.num_servers` local servers, whatever
`rollout.mode` says: a cluster fleet serves other weights), the run's reward scorer and stop
tokens, and the `eval` section's datasets and sampling (`pipeline.evaluation`). No trainer:
generation and scoring only."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from pipeline.data_plane import DataPlaneConfig
from pipeline.evaluation import EvalReport, Evaluator
from pipeline.fleet import EmbeddedFleetOptions, RolloutFleet
from pipeline.rewards import get_reward_scorer
from pipeline.stop_tokens import resolve_stop_token_ids


def evaluate_checkpoint(
    config: DataPlaneConfig, model_path: Path, log_dir: Path, policy_version: int = 0
) -> EvalReport:
    """The `config.eval` evaluation of the HF checkpoint at `model_path` (weights, config and
    tokenizer files); the servers' logs go to `log_dir`, and they are stopped by PID on return.

    Raises:
        ValueError: `eval.datasets` is empty, or no prompt of a dataset fits.
        FileNotFoundError: `model_path` holds no `config.json`.
    """
    from transformers import AutoTokenizer

    evaluation = config.eval
    if not evaluation.datasets:
        raise ValueError("the config's eval section names no datasets (eval.datasets)")
    if not (model_path / "config.json").is_file():
        raise FileNotFoundError(f"{model_path} is no HF checkpoint directory: no config.json")
    rollout = config.rollout.model_copy(
        update={"mode": "embedded", "placement": "separate", "use_router": False}
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    sample_tokens = evaluation.sample_tokens(rollout)
    options = EmbeddedFleetOptions(
        model_path=str(model_path),
        log_dir=log_dir,
        cpu_defaults=not torch.cuda.is_available(),
        dtype=config.policy_dtype,
        sample_tokens=sample_tokens,
        trainer_local_ranks=0,  # no trainer: the servers get the node
        visible_gpus=torch.cuda.device_count(),
    )
    reward = config.reward
    with get_reward_scorer(reward.function, reward.num_workers, reward.timeout_s) as scorer:
        evaluator = Evaluator.create(  # loads the prompts before any server starts
            evaluation,
            rollout,
            reward.score_truncated,
            tokenizer,
            scorer,
            resolve_stop_token_ids(rollout.stop_token_ids, model_path),
        )
        with RolloutFleet(rollout, options) as fleet:  # no routes: nothing replays them
            return asyncio.run(_evaluate(fleet, evaluator, sample_tokens, policy_version))


async def _evaluate(
    fleet: RolloutFleet, evaluator: Evaluator, sample_tokens: int, policy_version: int
) -> EvalReport:
    async with fleet.session() as session:
        client = fleet.client(session)
        try:
            await client.check_request_capacity(sample_tokens)
            return await evaluator.evaluate(client, policy_version)
        finally:
            await client.close()
