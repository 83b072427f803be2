"""Property tests: micro-batch invariance of loss and gradient, clip fractions, GSPO vs DAPO,
and the on-policy gradient. All in float64."""

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_dapo.algo.aggregation import (
    LOSS_AGGREGATIONS,
    LossNormalizers,
    count_loss_normalizers,
    get_loss_aggregation,
)
from megatron_dapo.algo.objective import ObjectiveConfig, policy_objective
from megatron_dapo.algo.policy_loss import POLICY_LOSSES, PolicyLossConfig, get_policy_loss

MAX_RESPONSE_LENGTH = 5
PROPERTY_SETTINGS = settings(deadline=None, max_examples=50)


@dataclass(frozen=True)
class Response:
    """One response's loss-relevant tokens."""

    log_probs: list[float]
    old_log_probs: list[float]
    mask: list[bool]
    advantage: float


@dataclass(frozen=True)
class Packed:
    """Responses packed into one micro-batch `[N]` (log_probs is a fresh leaf)."""

    log_probs: torch.Tensor
    old_log_probs: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    sequence_ids: torch.Tensor


def pack(responses: list[Response]) -> Packed:
    def flat(values: list[list[float]]) -> torch.Tensor:
        return torch.tensor([v for row in values for v in row], dtype=torch.float64)

    lengths = torch.tensor([len(r.mask) for r in responses], dtype=torch.int64)
    return Packed(
        log_probs=flat([r.log_probs for r in responses]).requires_grad_(),
        old_log_probs=flat([r.old_log_probs for r in responses]),
        advantages=flat([[r.advantage] * len(r.mask) for r in responses]),
        mask=torch.tensor([m for r in responses for m in r.mask], dtype=torch.bool),
        sequence_ids=torch.repeat_interleave(torch.arange(len(responses)), lengths),
    )


@st.composite
def responses_strategy(draw: st.DrawFn, max_abs_log_ratio: float = 0.6) -> list[Response]:
    responses = []
    for _ in range(draw(st.integers(1, 6))):
        length = draw(st.integers(0, MAX_RESPONSE_LENGTH))
        tokens = st.lists(st.floats(-4.0, 0.0), min_size=length, max_size=length)
        log_ratios = st.lists(
            st.floats(-max_abs_log_ratio, max_abs_log_ratio), min_size=length, max_size=length
        )
        log_probs = draw(tokens)
        responses.append(
            Response(
                log_probs=log_probs,
                old_log_probs=[lp - d for lp, d in zip(log_probs, draw(log_ratios), strict=True)],
                mask=draw(
                    st.lists(
                        st.sampled_from([True, True, True, False]), min_size=length, max_size=length
                    )
                ),
                advantage=draw(st.sampled_from([-1.5, -1.0, -0.25, 0.0, 0.5, 1.0, 2.0])),
            )
        )
    return responses


def split_points(num_responses: int) -> st.SearchStrategy[list[bool]]:
    """One flag per boundary between consecutive responses: True = start a new micro-batch."""
    return st.lists(st.booleans(), min_size=num_responses - 1, max_size=num_responses - 1)


def micro_batches(responses: list[Response], cuts: list[bool]) -> list[list[Response]]:
    batches = [[responses[0]]]
    for response, cut in zip(responses[1:], cuts, strict=True):
        if cut:
            batches.append([])
        batches[-1].append(response)
    return batches


configs = st.builds(
    PolicyLossConfig,
    eps_low=st.floats(0.0, 0.5),
    eps_high=st.floats(0.0, 0.5),
    dual_clip_c=st.none() | st.floats(1.05, 3.0),
    gspo_eps_low=st.floats(0.0, 0.5),
    gspo_eps_high=st.floats(0.0, 0.5),
    sapo_tau_pos=st.floats(0.1, 5.0),
    sapo_tau_neg=st.floats(0.1, 5.0),
)


def loss_and_grad(
    batch: Packed,
    loss_name: str,
    aggregation: str,
    config: PolicyLossConfig,
    normalizers: LossNormalizers,
) -> tuple[torch.Tensor, torch.Tensor]:
    output = get_policy_loss(loss_name)(
        batch.log_probs,
        batch.old_log_probs,
        batch.advantages,
        batch.mask,
        batch.sequence_ids,
        config,
    )
    loss = get_loss_aggregation(aggregation)(
        output.token_loss, batch.mask, batch.sequence_ids, normalizers
    )
    loss.backward()
    assert batch.log_probs.grad is not None
    return loss.detach(), batch.log_probs.grad


def padded_loss_and_grad(
    responses: list[Response],
    loss_name: str,
    aggregation: str,
    config: PolicyLossConfig,
    normalizers: LossNormalizers,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch padded to [B, MAX_RESPONSE_LENGTH]; the gradient at the packed positions."""
    shape = (len(responses), MAX_RESPONSE_LENGTH)
    log_probs = torch.zeros(shape, dtype=torch.float64)
    old_log_probs = torch.zeros(shape, dtype=torch.float64)
    mask = torch.zeros(shape, dtype=torch.bool)
    for row, response in enumerate(responses):
        length = len(response.mask)
        log_probs[row, :length] = torch.tensor(response.log_probs, dtype=torch.float64)
        old_log_probs[row, :length] = torch.tensor(response.old_log_probs, dtype=torch.float64)
        mask[row, :length] = torch.tensor(response.mask, dtype=torch.bool)
    advantages = torch.tensor([r.advantage for r in responses], dtype=torch.float64)
    rows = torch.arange(len(responses)).unsqueeze(1).expand(shape)
    padded = Packed(log_probs.requires_grad_(), old_log_probs, advantages[rows], mask, rows)
    loss, grad = loss_and_grad(padded, loss_name, aggregation, config, normalizers)
    is_token = torch.arange(MAX_RESPONSE_LENGTH) < torch.tensor(
        [len(r.mask) for r in responses]
    ).unsqueeze(1)
    return loss, grad[is_token]


@pytest.mark.parametrize("aggregation", sorted(LOSS_AGGREGATIONS))
@pytest.mark.parametrize("loss_name", sorted(POLICY_LOSSES))
@PROPERTY_SETTINGS
@given(data=st.data(), config=configs)
def test_loss_and_gradient_do_not_depend_on_micro_batching(
    loss_name: str, aggregation: str, data: st.DataObject, config: PolicyLossConfig
) -> None:
    responses = data.draw(responses_strategy())
    batches = micro_batches(responses, data.draw(split_points(len(responses))))
    packed_batches = [pack(batch) for batch in batches]
    normalizers = count_loss_normalizers(
        [b.mask for b in packed_batches],
        [b.sequence_ids for b in packed_batches],
        MAX_RESPONSE_LENGTH,
    )
    whole = pack(responses)
    assert normalizers == count_loss_normalizers(
        [whole.mask], [whole.sequence_ids], MAX_RESPONSE_LENGTH
    )

    whole_loss, whole_grad = loss_and_grad(whole, loss_name, aggregation, config, normalizers)
    split = [loss_and_grad(b, loss_name, aggregation, config, normalizers) for b in packed_batches]
    split_loss = torch.stack([loss for loss, _ in split]).sum()
    split_grad = torch.cat([grad for _, grad in split])
    torch.testing.assert_close(split_loss, whole_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(split_grad, whole_grad, rtol=1e-12, atol=1e-12)

    padded_loss, padded_grad = padded_loss_and_grad(
        responses, loss_name, aggregation, config, normalizers
    )
    torch.testing.assert_close(padded_loss, whole_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(padded_grad, whole_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss_name", sorted(POLICY_LOSSES))
@PROPERTY_SETTINGS
@given(data=st.data(), config=configs)
def test_clip_fractions_lie_in_unit_interval(
    loss_name: str, data: st.DataObject, config: PolicyLossConfig
) -> None:
    responses = data.draw(responses_strategy(max_abs_log_ratio=3.0))
    batches = [pack(b) for b in micro_batches(responses, data.draw(split_points(len(responses))))]
    normalizers = count_loss_normalizers(
        [b.mask for b in batches], [b.sequence_ids for b in batches]
    )
    objective = ObjectiveConfig(loss_name, "token-mean", config)
    per_batch = []
    for batch in batches:
        inputs = (batch.log_probs, batch.old_log_probs, batch.advantages, batch.mask)
        output = get_policy_loss(loss_name)(*inputs, batch.sequence_ids, config)
        indicators = (output.clipped_low, output.clipped_high, output.dual_clipped)
        for indicator in indicators:
            assert not (indicator & ~batch.mask).any()
        assert not (output.clipped_low & output.clipped_high).any()
        assert not (output.dual_clipped & (output.clipped_low | output.clipped_high)).any()
        entropy = torch.zeros_like(batch.log_probs)
        _, stats = policy_objective(
            *inputs[:1], entropy, *inputs[1:], batch.sequence_ids, normalizers, objective
        )
        assert stats.clipped_low.item() == int(output.clipped_low.sum())
        per_batch.append(stats)
    stats = per_batch[0]
    for other in per_batch[1:]:
        stats = stats + other
    fractions = [stats.clip_fraction_low(), stats.clip_fraction_high(), stats.dual_clip_fraction()]
    assert all(0.0 <= f <= 1.0 for f in fractions) and sum(fractions) <= 1.0 + 1e-12
    assert stats.num_tokens.item() == normalizers.num_tokens


@PROPERTY_SETTINGS
@given(
    tokens=st.lists(
        st.tuples(
            st.floats(-4.0, 0.0),
            st.floats(-1.0, 1.0),
            st.sampled_from([-1.0, 0.0, 0.7, 1.0]),
            st.booleans(),
        ),
        min_size=1,
        max_size=12,
    ),
    eps_low=st.floats(0.0, 0.5),
    eps_high=st.floats(0.0, 0.5),
    dual_clip_c=st.none() | st.floats(1.05, 2.0),
)
def test_gspo_equals_dapo_with_one_token_per_sequence(
    tokens: list[tuple[float, float, float, bool]],
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None,
) -> None:
    config = PolicyLossConfig(
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip_c=dual_clip_c,
        gspo_eps_low=eps_low,
        gspo_eps_high=eps_high,
    )
    responses = [
        Response([lp], [lp - log_ratio], [mask], adv) for lp, log_ratio, adv, mask in tokens
    ]
    outputs = {}
    for name in ("dapo", "gspo"):
        batch = pack(responses)
        output = get_policy_loss(name)(
            batch.log_probs,
            batch.old_log_probs,
            batch.advantages,
            batch.mask,
            batch.sequence_ids,
            config,
        )
        output.token_loss.sum().backward()
        outputs[name] = (output, batch.log_probs.grad)
    (dapo, dapo_grad), (gspo, gspo_grad) = outputs["dapo"], outputs["gspo"]
    torch.testing.assert_close(gspo.token_loss, dapo.token_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gspo_grad, dapo_grad, rtol=1e-12, atol=1e-12)
    for field in ("clipped_low", "clipped_high", "dual_clipped"):
        assert torch.equal(getattr(gspo, field), getattr(dapo, field))


@pytest.mark.parametrize("loss_name", sorted(POLICY_LOSSES))
@PROPERTY_SETTINGS
@given(data=st.data(), config=configs)
def test_on_policy_gradient_is_minus_advantage_over_token_count(
    loss_name: str, data: st.DataObject, config: PolicyLossConfig
) -> None:
    # r == 1 exactly: every clipped/gated loss reduces to the policy gradient -A per token,
    # so with token-mean the gradient w.r.t. log_probs is -A / N at loss tokens and 0 elsewhere.
    responses = [
        Response(r.log_probs, r.log_probs, r.mask, r.advantage)
        for r in data.draw(responses_strategy())
    ]
    batch = pack(responses)
    normalizers = count_loss_normalizers([batch.mask], [batch.sequence_ids])
    _, grad = loss_and_grad(batch, loss_name, "token-mean", config, normalizers)
    expected = torch.where(batch.mask, -batch.advantages / max(normalizers.num_tokens, 1), 0.0)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)
