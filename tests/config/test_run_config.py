"""The run-config schema, YAML loading, dotted overrides and their error messages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pydantic
import pytest

from megatron_dapo.algo.aggregation import LOSS_AGGREGATIONS
from megatron_dapo.algo.policy_loss import PAPER_RECIPES, POLICY_LOSSES
from megatron_dapo.config.loading import ConfigError, load_config
from megatron_dapo.config.schema import AlgorithmConfig, RunConfig

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
DEMO = REPO / "configs" / "demo-cpu.yaml"


def test_the_three_documented_configs_ship() -> None:
    names = {p.name for p in SHIPPED_CONFIGS}
    assert {"demo-cpu.yaml", "dapo-qwen2.5-32b.yaml", "dapo-qwen3-30b-a3b.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, RunConfig)
    assert config.data_parallel_size >= 1


def test_paper_config_matches_dapo_paper() -> None:
    cfg = load_config(REPO / "configs" / "dapo-qwen2.5-32b.yaml")
    assert (cfg.optimizer.lr, cfg.optimizer.lr_warmup_steps, cfg.optimizer.lr_decay_style) == (
        1e-6,
        20,
        "constant",
    )
    assert (cfg.training.prompts_per_step, cfg.rollout.n_samples_per_prompt) == (512, 16)
    assert cfg.training.mini_batch_size == 512
    assert (cfg.algorithm.eps_low, cfg.algorithm.eps_high) == (0.2, 0.28)
    assert (cfg.rollout.max_response_length, cfg.reward.overlong.cache_length) == (20480, 4096)
    assert cfg.algorithm.kl_coef == 0.0 and cfg.algorithm.loss_aggregation == "token-mean"
    assert cfg.algorithm.dynamic_sampling.enabled


def test_moe_config_layout_fits_64_gpus() -> None:
    cfg = load_config(REPO / "configs" / "dapo-qwen3-30b-a3b.yaml")
    assert cfg.launch.world_size == 64
    assert cfg.model.moe is not None and cfg.model.moe.num_experts == 128
    par = cfg.parallelism
    assert par.tensor * par.pipeline * cfg.data_parallel_size == 64
    assert cfg.model.moe.num_experts % par.expert == 0


def test_demo_is_a_two_rank_moe() -> None:
    cfg = load_config(DEMO)
    assert cfg.model.moe is not None and cfg.launch.world_size == 2
    assert cfg.parallelism.tensor * cfg.parallelism.expert > 1


def test_dotted_overrides_are_parsed_as_yaml_values() -> None:
    cfg = load_config(
        DEMO,
        [
            "algorithm.eps_high=0.3",
            "training.steps=7",
            "algorithm.dual_clip_c=3",
            "rollout.server_args=[--foo, bar]",
            "model.moe.grouped_gemm=true",
            "model.transformer_impl=transformer_engine",
        ],
    )
    assert cfg.algorithm.eps_high == 0.3
    assert cfg.training.steps == 7
    assert cfg.algorithm.dual_clip_c == 3.0
    assert cfg.rollout.server_args == ("--foo", "bar")
    assert cfg.model.moe is not None and cfg.model.moe.grouped_gemm is True


def test_override_can_create_a_missing_section_and_null_a_value() -> None:
    cfg = load_config(DEMO, ["model.moe=null", "parallelism.expert=1"])
    assert cfg.model.moe is None


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def _demo_with(tmp_path: Path, old: str, new: str) -> Path:
    text = DEMO.read_text()
    assert old in text
    return _write(tmp_path, text.replace(old, new))


def _line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_unknown_key_names_file_line_and_suggestion(tmp_path: Path) -> None:
    path = _demo_with(tmp_path, "  eps_high: 0.28", "  eps_hihg: 0.28")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert f"{path}:{_line_of(path, 'eps_hihg')}" in message
    assert "unknown key 'algorithm.eps_hihg'" in message
    assert "did you mean 'eps_high'" in message


def test_bad_value_names_file_line_key_value_and_expectation(tmp_path: Path) -> None:
    path = _demo_with(tmp_path, "  eps_low: 0.2", "  eps_low: 1.5")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert f"{path}:{_line_of(path, 'eps_low')}: algorithm.eps_low = 1.5" in message
    assert "eps_low must be in [0, 1), got 1.5" in message


def test_wrong_type_and_bad_literal_are_reported_together(tmp_path: Path) -> None:
    path = _demo_with(tmp_path, "  policy_loss: dapo", "  policy_loss: ppo")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["training.steps=many"])
    message = str(err.value)
    assert "algorithm.policy_loss = 'ppo': unknown policy loss 'ppo'; valid names:" in message
    assert "'dapo'" in message
    assert "override 'training.steps=many': training.steps = 'many'" in message


def test_missing_required_section(tmp_path: Path) -> None:
    path = _write(tmp_path, "model:\n  num_layers: 2\n")
    with pytest.raises(ConfigError, match="missing required key 'training'"):
        load_config(path)


def test_cross_section_rule_is_explained(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="parallelism.tensor=3 must divide"):
        load_config(DEMO, ["parallelism.tensor=3"])
    with pytest.raises(ConfigError, match="sequence_parallel=true for MoE"):
        load_config(DEMO, ["parallelism.tensor=2", "parallelism.expert=1"])
    with pytest.raises(ConfigError, match="mini_batch_size=60 must divide"):
        load_config(DEMO, ["training.mini_batch_size=60"])
    with pytest.raises(ConfigError, match="needs an MoE model"):
        load_config(DEMO, ["model.moe=null"])


def test_grouped_gemm_needs_transformer_engine() -> None:
    """The local spec's grouped GEMM is Megatron-Core's legacy GroupedMLP: no HF mapping."""
    with pytest.raises(ConfigError, match="grouped_gemm=true needs model.transformer_impl"):
        load_config(DEMO, ["model.moe.grouped_gemm=true"])


def test_yaml_syntax_error_points_at_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "model:\n  num_layers: [1,\n")
    with pytest.raises(ConfigError, match=rf"{path}:3:1: not valid YAML"):
        load_config(path)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("bad", ["algorithm.eps_high", "=3", "a..b=1"])
def test_malformed_override(bad: str) -> None:
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(DEMO, [bad])


def test_override_through_a_scalar_is_rejected() -> None:
    with pytest.raises(ConfigError, match="algorithm.eps_high is a float, not a section"):
        load_config(DEMO, ["algorithm.eps_high.x=1"])


def test_configs_are_immutable() -> None:
    cfg = load_config(DEMO)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.algorithm.eps_high = 0.5  # type: ignore[misc]


@pytest.mark.parametrize("policy_loss", sorted(POLICY_LOSSES))
def test_a_policy_loss_alone_brings_its_paper_recipe(policy_loss: str) -> None:
    algorithm = AlgorithmConfig(policy_loss=policy_loss)
    recipe = PAPER_RECIPES[policy_loss]
    assert algorithm.advantage.estimator == recipe.advantage_estimator
    assert algorithm.loss_aggregation == recipe.loss_aggregation
    assert algorithm.loss_aggregation in LOSS_AGGREGATIONS


def test_dr_grpo_alone_runs_dr_grpo_not_grpo() -> None:
    unset = ["algorithm.advantage.estimator=null", "algorithm.loss_aggregation=null"]
    cfg = load_config(DEMO, ["algorithm.policy_loss=dr_grpo", *unset])
    algorithm = cfg.algorithm
    assert (algorithm.advantage.estimator, algorithm.loss_aggregation) == (
        "dr_grpo",
        "seq-mean-token-sum-norm",
    )
    assert cfg.data_plane_config().advantage.estimator == "dr_grpo"
    assert cfg.loss_norm_constant == cfg.rollout.max_response_length


def test_a_pairing_against_the_recipe_names_the_paper(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, ["algorithm.policy_loss=dr_grpo"])  # the demo sets grpo, token-mean
    message = str(err.value)
    assert "policy_loss 'dr_grpo' is Dr. GRPO (arXiv 2503.20783)" in message
    assert "advantage_estimator 'grpo' (the recipe has 'dr_grpo')" in message
    assert "loss_aggregation 'token-mean' (the recipe has 'seq-mean-token-sum-norm')" in message
    with pytest.raises(ConfigError, match="GSPO .*loss_aggregation 'token-mean'"):
        load_config(DEMO, ["algorithm.policy_loss=gspo"])
    # ablations keep the free choices: clip-higher with the sample-level loss (DAPO Table 1)
    ablation = load_config(DEMO, ["algorithm.loss_aggregation=seq-mean-token-mean"])
    assert ablation.algorithm.objective_at(0).loss_aggregation == "seq-mean-token-mean"


def test_advantage_options_reach_the_data_plane() -> None:
    cfg = load_config(
        DEMO, ["algorithm.advantage.std_eps=0.01", "algorithm.advantage.unbiased_std=false"]
    )
    sections = cfg.data_plane_config()
    assert (sections.advantage.std_eps, sections.advantage.unbiased_std) == (0.01, False)
    assert sections.groups_per_step == cfg.training.prompts_per_step
    assert sections.sampling is cfg.algorithm.dynamic_sampling and sections.rollout is cfg.rollout
    with pytest.raises(ConfigError, match="algorithm.advantage.estimator = 'rloo': unknown"):
        load_config(DEMO, ["algorithm.advantage.estimator=rloo"])


def test_routing_replay_reaches_the_data_plane_as_the_models_routing() -> None:
    assert load_config(DEMO).data_plane_config().routing is None
    routing = load_config(DEMO, ["algorithm.routing_replay=rollout"]).data_plane_config().routing
    assert (routing.num_layers, routing.topk, routing.num_experts) == (2, 2, 4)
    assert routing.bytes_per_token == 4  # 2 layers x top-2 x uint8


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["algorithm.routing_replay=rollout", "model.moe.load_balancing_type=sinkhorn"],
            "algorithm.routing_replay='rollout' replays top-k routes: it needs an MoE model",
        ),
        (
            ["algorithm.kl_coef=0.1", "model.hf_checkpoint=null"],
            "algorithm.kl_coef=0.1 needs model.hf_checkpoint: the reference policy is the "
            "checkpoint the run starts from",
        ),
        (["algorithm.kl_coef=-0.1"], "Input should be greater than or equal to 0"),
        (["algorithm.kl_estimator=k2"], "unknown KL estimator 'k2'; valid names: ['k1', 'k3',"),
        (["rollout.temperature=0"], "rollout.temperature=0.0 must be > 0"),
        (["algorithm.dual_clip_c=1.0"], "dual_clip_c must be finite and > 1, got 1.0"),
        (["algorithm.eps_high_end=-0.1"], "eps_high_end must be finite and >= 0, got -0.1"),
        (
            ["algorithm.eps_high_schedule=linear", "algorithm.eps_high_schedule_steps=10"],
            "eps_high_schedule='linear' with eps_high_end=None, eps_high_schedule_steps=10: "
            "EpsHighSchedule.end is required",
        ),
        (["algorithm.eps_high_schedule=step"], "Input should be 'constant', 'linear' or 'cosine'"),
    ],
)
def test_algorithm_rules_are_checked_at_load_time(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(DEMO, overrides)


def _hf_checkpoint(directory: Path, **changes: object) -> Path:
    """A checkpoint directory with only a Qwen3-MoE `config.json` (all the architecture needs)."""
    hf = {
        "model_type": "qwen3_moe",
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 104,
        "max_position_embeddings": 512,
        "rope_theta": 1e6,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.001,
        **changes,
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf))
    return directory


def _demo_on(checkpoint: Path, *overrides: str) -> RunConfig:
    """The demo's run config with its model section replaced by `model.hf_checkpoint` alone."""
    return load_config(DEMO, ["model=null", f"model.hf_checkpoint={checkpoint}", *overrides])


def test_the_architecture_comes_from_the_checkpoint(tmp_path: Path) -> None:
    checkpoint = _hf_checkpoint(tmp_path / "ckpt")
    model = _demo_on(checkpoint, "model.moe.token_dispatcher=allgather").model
    assert (model.num_layers, model.hidden_size, model.num_query_groups) == (2, 64, 2)
    assert (model.kv_channels, model.rotary_base, model.qk_layernorm) == (16, 1e6, True)
    assert model.moe is not None and (model.moe.num_experts, model.moe.ffn_hidden_size) == (4, 32)
    assert model.moe.token_dispatcher == "allgather"  # a training choice stays the run's
    same = _demo_on(checkpoint, "model.hidden_size=64", "model.moe.aux_loss_coeff=0.01").model
    assert same.hidden_size == 64 and same.moe is not None and same.moe.aux_loss_coeff == 0.01


def test_a_field_that_disagrees_with_the_checkpoint_names_both_values(tmp_path: Path) -> None:
    checkpoint = _hf_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ConfigError) as err:
        _demo_on(checkpoint, "model.hidden_size=32", "model.moe.num_experts=8")
    message = str(err.value)
    assert f"the architecture differs from {checkpoint / 'config.json'}" in message
    assert "hidden_size is 32 in the run config but 64" in message
    assert "moe.num_experts is 8 in the run config but 4" in message
    dense = _hf_checkpoint(tmp_path / "dense", model_type="llama")
    with pytest.raises(ConfigError, match="moe is set in the run config but the checkpoint is"):
        _demo_on(dense, "model.moe.num_experts=4")


def test_a_checkpoint_without_config_needs_the_architecture_in_the_run_config(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match="missing required key 'model.num_layers'"):
        _demo_on(tmp_path / "not-yet-written")
    written_later = load_config(DEMO, [f"model.hf_checkpoint={tmp_path / 'random'}"])
    assert written_later.model.random_init == "mixtral"  # the demo writes it on first start


def test_rollout_correction_needs_recomputed_old_log_probs() -> None:
    token = ["algorithm.rollout_correction.mode=token"]
    assert load_config(DEMO, token).algorithm.objective_at(0).rollout_correction == "token"
    with pytest.raises(ConfigError, match="it needs old_log_probs='recompute'"):
        load_config(DEMO, [*token, "algorithm.old_log_probs=rollout"])
    with pytest.raises(ConfigError, match="threshold = 0: Input should be greater than 0"):
        load_config(DEMO, [*token, "algorithm.rollout_correction.threshold=0"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data.max_prompt_length=400", "rollout.max_response_length=111"],
            "a sample of data.max_prompt_length=400 + rollout.max_response_length=111 = 511 "
            "tokens needs 513 tokens of the model's context (the server keeps some), more than "
            "model.max_position_embeddings=512",
        ),
        (
            ["training.micro_batch_max_tokens=128"],
            "a sample of data.max_prompt_length=128 + rollout.max_response_length=1 = 129 "
            "tokens does not fit one micro-batch, training.micro_batch_max_tokens=128",
        ),
    ],
)
def test_a_sample_that_cannot_fit_is_refused_before_anything_starts(
    overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(DEMO, overrides)


def test_a_sample_that_just_fits_is_accepted() -> None:
    # 128 + 382 + 2 = 512 = the context; 128 + 382 = 510 <= 512 tokens per micro-batch
    config = load_config(DEMO, ["rollout.max_response_length=382"])
    assert config.data.max_prompt_length + config.rollout.max_response_length == 510
