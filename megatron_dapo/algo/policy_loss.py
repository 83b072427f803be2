"""Policy-gradient losses selected by name: dapo, grpo, gspo, dr_grpo, sapo.

Every loss is a pure function

    loss(log_probs, old_log_probs, advantages, loss_mask, sequence_ids, config) -> PolicyLossOutput

returning PER-TOKEN losses (to be minimised, not yet averaged); `aggregation` reduces them with a
global normaliser. `PAPER_RECIPES` names the advantage estimator and aggregation mode each
variant is defined with in its paper, and which of the two define the variant.

Token layout: all token tensors share one arbitrary shape (packed `[N]` or padded `[B, S]`).
`log_probs` (requires grad) and `old_log_probs` are log-probabilities of the sampled tokens in
nats; `advantages` holds each token's sequence advantage; `loss_mask` is nonzero at loss tokens;
`sequence_ids` (int64) indexes each token's sequence within the micro-batch (only GSPO uses it).
Values at masked-out positions are ignored, even if non-finite; at loss tokens non-finite
advantages raise ValueError, while non-finite log-probs (a model overflow) make the loss
non-finite.

Ratios: r = exp(log_probs - old_log_probs), with the log-ratio clamped to +-MAX_ABS_LOG_RATIO
(kl.py) so that exp() cannot overflow (a token beyond the clamp gets no gradient).

Clipping (dapo, grpo, dr_grpo, gspo) is PPO's pessimistic bound with decoupled ranges:

    loss = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)

The upper bound only binds when A > 0 and r > 1 + eps_high (`clipped_high`), the lower bound
only when A < 0 and r < 1 - eps_low (`clipped_low`); a clipped token's loss is the constant bound
times -A, so its gradient is 0. On a bound exactly (r == 1 + eps_high) the token is not clipped.
Optional dual clip (Ye et al. 2020, arXiv 1912.09729; verl's clip_ratio_c): for A < 0 the loss
is additionally capped at -c A, i.e. loss = min(loss, -c A), binding when r > c
(`dual_clipped`, zero gradient). SAPO replaces the hard clip with a smooth gate; its clip
indicators are all False.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_dapo.algo.aggregation import broadcast_to_tokens, segment_mean
from megatron_dapo.algo.kl import MAX_ABS_LOG_RATIO
from pipeline.registry import Registry


@dataclass(frozen=True)
class ParameterRange:
    """The values a loss hyper-parameter may take, and how to say so."""

    description: str
    contains: Callable[[float], bool]

    def validate(self, name: str, value: float) -> None:
        """Raise ValueError naming `name` unless `value` lies in the range."""
        if not self.contains(value):
            raise ValueError(f"{name} must be {self.description}, got {value!r}")


_UNIT_INTERVAL = ParameterRange("in [0, 1)", lambda value: 0.0 <= value < 1.0)
_NON_NEGATIVE = ParameterRange("finite and >= 0", lambda value: 0.0 <= value < math.inf)
_POSITIVE = ParameterRange("finite and > 0", lambda value: 0.0 < value < math.inf)
_ABOVE_ONE = ParameterRange("finite and > 1", lambda value: 1.0 < value < math.inf)

LOSS_PARAMETER_RANGES: dict[str, ParameterRange] = {
    "eps_low": _UNIT_INTERVAL,
    "eps_high": _NON_NEGATIVE,
    "dual_clip_c": _ABOVE_ONE,
    "gspo_eps_low": _UNIT_INTERVAL,
    "gspo_eps_high": _NON_NEGATIVE,
    "sapo_tau_pos": _POSITIVE,
    "sapo_tau_neg": _POSITIVE,
}
"""The one home of the loss hyper-parameters' ranges: `PolicyLossConfig` and the run config's
`algorithm` section both validate with it."""


@dataclass(frozen=True)
class PolicyLossConfig:
    """Hyper-parameters of the policy losses (defaults: the respective papers).

    Attributes:
        eps_low: lower clip range, ratio floor 1 - eps_low; in [0, 1). DAPO 0.2.
        eps_high: upper clip range, ratio ceiling 1 + eps_high; >= 0. DAPO 0.28. `grpo` and
            `dr_grpo` ignore it and clip symmetrically with eps_low.
        dual_clip_c: dual-clip cap c > 1 for A < 0 tokens; None = off.
        gspo_eps_low, gspo_eps_high: GSPO's clip ranges of the sequence ratio (paper 3e-4, 4e-4).
        sapo_tau_pos, sapo_tau_neg: SAPO gate temperatures for A > 0 and A <= 0 (paper 1.0, 1.05).
    """

    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip_c: float | None = None
    gspo_eps_low: float = 3e-4
    gspo_eps_high: float = 4e-4
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05

    def __post_init__(self) -> None:
        for name, allowed in LOSS_PARAMETER_RANGES.items():
            value = getattr(self, name)
            if value is not None:  # only dual_clip_c may be None (off)
                allowed.validate(f"PolicyLossConfig.{name}", value)


@dataclass(frozen=True)
class PolicyLossOutput:
    """Per-token result of a policy loss; every tensor has the token shape of the inputs.

    Attributes:
        token_loss: loss per token (advantage units), differentiable w.r.t. `log_probs`;
            0 at masked-out positions.
        log_ratio: detached log pi_theta - log pi_old per token (nats), 0 at masked-out positions.
        clipped_low: bool, loss token with A < 0 clipped at 1 - eps_low.
        clipped_high: bool, loss token with A > 0 clipped at 1 + eps_high.
        dual_clipped: bool, loss token with A < 0 capped by the dual clip.
    """

    token_loss: torch.Tensor
    log_ratio: torch.Tensor
    clipped_low: torch.Tensor
    clipped_high: torch.Tensor
    dual_clipped: torch.Tensor


PolicyLossFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, PolicyLossConfig],
    PolicyLossOutput,
]

POLICY_LOSSES = Registry[PolicyLossFn]("policy loss")
register_policy_loss = POLICY_LOSSES.register
get_policy_loss = POLICY_LOSSES.get


@dataclass(frozen=True)
class LossRecipe:
    """How a paper pairs its policy loss with an advantage estimator and an aggregation mode.

    Attributes:
        paper: the variant's paper, for messages.
        advantage_estimator: the estimator the paper uses (registry name).
        loss_aggregation: the aggregation mode the paper uses (registry name).
        fixed: which of `advantage_estimator` / `loss_aggregation` define the variant: another
            choice there is not that variant. The others are free, for ablations (DAPO's Table 1
            runs clip-higher with GRPO's sample-level loss).
    """

    paper: str
    advantage_estimator: str
    loss_aggregation: str
    fixed: tuple[str, ...] = ()

    def conflicts(self, advantage_estimator: str, loss_aggregation: str) -> list[str]:
        """The fixed choices that the given pairing contradicts, described."""
        chosen = {
            "advantage_estimator": advantage_estimator,
            "loss_aggregation": loss_aggregation,
        }
        return [
            f"{field} {chosen[field]!r} (the recipe has {getattr(self, field)!r})"
            for field in self.fixed
            if chosen[field] != getattr(self, field)
        ]


PAPER_RECIPES: dict[str, LossRecipe] = {
    "dapo": LossRecipe("DAPO (arXiv 2503.14476)", "grpo", "token-mean"),
    "grpo": LossRecipe("GRPO (arXiv 2402.03300)", "grpo", "seq-mean-token-mean"),
    "gspo": LossRecipe(
        "GSPO (arXiv 2507.18071)", "grpo", "seq-mean-token-mean", fixed=("loss_aggregation",)
    ),
    "dr_grpo": LossRecipe(
        "Dr. GRPO (arXiv 2503.20783)",
        "dr_grpo",
        "seq-mean-token-sum-norm",
        fixed=("advantage_estimator", "loss_aggregation"),
    ),
    "sapo": LossRecipe("SAPO (arXiv 2511.20347)", "grpo", "seq-mean-token-mean"),
}
"""Every registered policy loss's paper recipe. `dr_grpo`'s per-token loss is `grpo`'s, so the
name means its advantage and aggregation; GSPO's clip acts on whole sequences, so its
aggregation weighs sequences, not tokens."""


@dataclass(frozen=True)
class _MaskedTokens:
    """Validated inputs with masked-out positions replaced by zeros (NaN-safe in backward)."""

    mask: torch.Tensor
    log_probs: torch.Tensor
    log_ratio: torch.Tensor
    advantages: torch.Tensor


def _mask_inputs(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    sequence_ids: torch.Tensor,
) -> _MaskedTokens:
    named = {
        "old_log_probs": old_log_probs,
        "advantages": advantages,
        "loss_mask": loss_mask,
        "sequence_ids": sequence_ids,
    }
    for name, tensor in named.items():
        if tensor.shape != log_probs.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, log_probs has {tuple(log_probs.shape)}"
            )
    if sequence_ids.dtype != torch.int64:
        raise ValueError(f"sequence_ids must be int64, got {sequence_ids.dtype}")
    mask = loss_mask.bool()
    # Advantages are data and must be finite. Log-probs, pi_theta's and pi_old's alike, come
    # from a model (pi_old from the trainer's own forward pass, or the rollout's, which
    # `TrainBatch` checks): an overflow carries NaN into the loss, which the trainer skips or
    # stops on (`training.on_nonfinite`).
    non_finite = int((mask & ~torch.isfinite(advantages.detach())).sum())
    if non_finite:
        raise ValueError(f"at loss-mask positions: advantages has {non_finite} non-finite value(s)")
    safe_log_probs = torch.where(mask, log_probs, 0)
    return _MaskedTokens(
        mask=mask,
        log_probs=safe_log_probs,
        log_ratio=safe_log_probs - torch.where(mask, old_log_probs, 0),
        advantages=torch.where(mask, advantages, 0),
    )


def _ratio(log_ratio: torch.Tensor) -> torch.Tensor:
    return torch.exp(log_ratio.clamp(-MAX_ABS_LOG_RATIO, MAX_ABS_LOG_RATIO))


def _clipped_surrogate_loss(
    tokens: _MaskedTokens,
    ratio: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None,
) -> PolicyLossOutput:
    """-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), capped at -c A for A < 0 if c is set.

    `ratio` is the differentiable importance ratio per token (token or sequence level). Clipped
    tokens use the bound as a constant, so their gradient is exactly 0.
    """
    advantages, mask = tokens.advantages, tokens.mask
    lower, upper = 1.0 - eps_low, 1.0 + eps_high
    clipped_high = mask & (advantages > 0) & (ratio > upper)
    clipped_low = mask & (advantages < 0) & (ratio < lower)
    effective_ratio = torch.where(clipped_low | clipped_high, ratio.clamp(lower, upper), ratio)
    if dual_clip_c is None:
        dual_clipped = torch.zeros_like(mask)
    else:
        dual_clipped = mask & (advantages < 0) & (ratio > dual_clip_c)
        effective_ratio = torch.where(dual_clipped, ratio.clamp(max=dual_clip_c), effective_ratio)
    return PolicyLossOutput(
        token_loss=torch.where(mask, -advantages * effective_ratio, 0),
        log_ratio=tokens.log_ratio.detach(),
        clipped_low=clipped_low,
        clipped_high=clipped_high,
        dual_clipped=dual_clipped,
    )


@register_policy_loss("dapo")
def dapo_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    sequence_ids: torch.Tensor,
    config: PolicyLossConfig,
) -> PolicyLossOutput:
    """DAPO clip-higher: token ratio clipped to [1 - eps_low, 1 + eps_high], optional dual clip.

    Shapes and units: see the module docstring.
    """
    tokens = _mask_inputs(log_probs, old_log_probs, advantages, loss_mask, sequence_ids)
    return _clipped_surrogate_loss(
        tokens, _ratio(tokens.log_ratio), config.eps_low, config.eps_high, config.dual_clip_c
    )


@register_policy_loss("dr_grpo")
@register_policy_loss("grpo")
def grpo_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    sequence_ids: torch.Tensor,
    config: PolicyLossConfig,
) -> PolicyLossOutput:
    """PPO/GRPO symmetric clip: token ratio clipped to [1 - eps_low, 1 + eps_low].

    Also registered as `dr_grpo`: Dr. GRPO (arXiv 2503.20783) keeps this per-token loss and
    changes only the advantage (no std) and the aggregation (constant normaliser), see
    `PAPER_RECIPES`. Shapes and units: see the module docstring.
    """
    tokens = _mask_inputs(log_probs, old_log_probs, advantages, loss_mask, sequence_ids)
    return _clipped_surrogate_loss(
        tokens, _ratio(tokens.log_ratio), config.eps_low, config.eps_low, config.dual_clip_c
    )


@register_policy_loss("gspo")
def gspo_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    sequence_ids: torch.Tensor,
    config: PolicyLossConfig,
) -> PolicyLossOutput:
    """GSPO (arXiv 2507.18071), token form "GSPO-token" with the sequence ratio clipped.

    s_i = exp(mean over sequence i's loss tokens of log r_it) is the length-normalised sequence
    ratio. Token form: s_it = sg[s_i] * exp(logp_it - sg[logp_it]), whose value is s_i and whose
    gradient is s_i * grad logp_it (sg = stop-gradient). Every token of sequence i is clipped
    to [1 - gspo_eps_low, 1 + gspo_eps_high] together (dual clip applies if set). With
    `seq-mean-token-mean` aggregation this is GSPO's sequence-level objective; with one token
    per sequence it equals `dapo_policy_loss` at the same eps. Shapes: see the module docstring.
    """
    tokens = _mask_inputs(log_probs, old_log_probs, advantages, loss_mask, sequence_ids)
    sequence_log_ratio = segment_mean(tokens.log_ratio.detach(), sequence_ids, tokens.mask)
    token_sequence_log_ratio = broadcast_to_tokens(sequence_log_ratio, sequence_ids, tokens.mask)
    log_sequence_ratio = token_sequence_log_ratio + tokens.log_probs - tokens.log_probs.detach()
    return _clipped_surrogate_loss(
        tokens,
        _ratio(log_sequence_ratio),
        config.gspo_eps_low,
        config.gspo_eps_high,
        config.dual_clip_c,
    )


@register_policy_loss("sapo")
def sapo_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    sequence_ids: torch.Tensor,
    config: PolicyLossConfig,
) -> PolicyLossOutput:
    """SAPO (arXiv 2511.20347): the hard clip replaced by a smooth gate.

    loss = -f(r) A with f(r) = sigmoid(tau (r - 1)) * 4 / tau, tau = sapo_tau_pos if A > 0
    else sapo_tau_neg. df/dr = 4 sigmoid (1 - sigmoid), which is 1 at r = 1 (the unclipped
    policy gradient on-policy) and decays smoothly as r leaves 1, faster for larger tau;
    f(1) = 2 / tau. No token is hard-clipped, so the clip indicators are all False. Shapes:
    see the module docstring.
    """
    tokens = _mask_inputs(log_probs, old_log_probs, advantages, loss_mask, sequence_ids)
    ratio = _ratio(tokens.log_ratio)
    tau = torch.where(
        tokens.advantages > 0,
        ratio.new_tensor(config.sapo_tau_pos),
        ratio.new_tensor(config.sapo_tau_neg),
    )
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    not_clipped = torch.zeros_like(tokens.mask)
    return PolicyLossOutput(
        token_loss=torch.where(tokens.mask, -tokens.advantages * gate, 0),
        log_ratio=tokens.log_ratio.detach(),
        clipped_low=not_clipped,
        clipped_high=not_clipped,
        dual_clipped=not_clipped,
    )
