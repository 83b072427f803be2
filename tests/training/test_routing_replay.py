"""MoE routing replay (`algorithm.routing_replay: rollout`) on one rank.

Tiny HF checkpoints of the Qwen3-MoE and Mixtral layouts (`hf_worker`: 2 layers, 4 experts,
top-2) are loaded into the trainer; a forward hook on every router records the routing it
applied (`routing_map`, `[T, E]` bool) in each pass.

* Recorded routes (random distinct experts per token): every router call of the pi_old pass,
  the training forward and, with full recompute, the forward re-run in the backward pass routes
  every token of its micro-batch, padding included (experts 0..K-1), exactly as the batch says.
* Replaying the trainer's own routing (recorded without replay) changes nothing, bit for bit,
  and with replay off a batch's routes are ignored, bit for bit.
* A real CPU SGLang server (`server`), serving the checkpoint in bfloat16, returns the routes.
  The checkpoints' routers have a near tie (`make_near_ties`), so the bf16 fleet routes some
  tokens otherwise than the float32 trainer in every run: without replay the trainer disagrees,
  with replay it routes every token the fleet routed as the fleet did, and the mismatch KL
  falls (measured: Qwen3-MoE 2.8e-3 -> 2.1e-5 nats with 79 disagreeing (token, layer) pairs
  without replay, Mixtral 2.4e-3 -> 1.0e-5 with 94; without the near tie a run drew 0 to 3
  and sometimes none).

Measured on 2 cores: 12 s for the recorded-route tests, 75 s for the two server cases.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
import torch
from hf_worker import VOCAB, make_hf_checkpoint
from safetensors.torch import load_file, save_file
from training_helpers import random_train_batch, tiny_run_config

from megatron_dapo.config.hf_architecture import model_fields_from_hf
from megatron_dapo.config.schema import RunConfig
from megatron_dapo.mcore.parallel import DistributedEnv, destroy_parallel, initialize_parallel
from megatron_dapo.mcore.policy_step import PolicyTrainer, TrainResult
from pipeline.config import RolloutConfig
from pipeline.fleet import EmbeddedFleetOptions, RolloutFleet
from pipeline.sglang_client import Generation, SamplingParams, SGLangServerClient
from pipeline.sglang_server import free_port
from pipeline.train_batch import ExpertRouting, TrainBatch, unrouted

pytestmark = pytest.mark.slow

LAYOUTS = ("qwen3_moe", "mixtral")
ROUTING = ExpertRouting(num_layers=2, topk=2, num_experts=4)
"""The routing of `hf_worker`'s tiny MoE checkpoints."""
LENGTHS = (17, 9, 30, 5, 22, 12, 26, 8)
"""Sample lengths of the recorded-route batches (micro-batches of at most 32 tokens)."""


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    config = tiny_run_config()
    env = DistributedEnv(0, 1, 0, "127.0.0.1", free_port())
    initialize_parallel(config.parallelism, env, seed=7)
    yield
    destroy_parallel()


@pytest.fixture(scope="module", params=LAYOUTS)
def checkpoint(request, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp(request.param)
    make_hf_checkpoint(request.param, directory)
    make_near_ties(directory / "model.safetensors")
    return directory


def make_near_ties(weights: Path, relative: float = 1e-3) -> None:
    """Give expert 1 of every router expert 0's gate row, perturbed by `relative` (in place).

    Wherever the pair straddles the top-2 boundary (about a third of the tokens) its order is
    decided by a logit difference far below bfloat16's rounding (2^-8 relative), so a bf16
    fleet routes some of those tokens otherwise than the fp32 trainer in every run, not only
    when its sampled tokens happen to land on a near tie."""
    tensors = load_file(weights)
    generator = torch.Generator().manual_seed(0)
    for name, gate in tensors.items():
        if name.endswith(".gate.weight") and gate.shape[0] == ROUTING.num_experts:
            noise = torch.randn(gate.shape[1], generator=generator) * gate[0].abs().mean()
            gate[1] = gate[0] + relative * noise
    save_file(tensors, weights, metadata={"format": "pt"})


def run_config(checkpoint: Path, replay: bool, recompute: str = "none") -> RunConfig:
    """`tiny_run_config`'s run on the HF checkpoint (architecture from its config.json)."""
    fields = tiny_run_config(moe=True, max_tokens=32).model_dump()
    fields["model"] = {
        "hf_checkpoint": str(checkpoint),
        **model_fields_from_hf(checkpoint),
        "moe": {**model_fields_from_hf(checkpoint)["moe"], "aux_loss_coeff": 1e-2},
    }
    fields["algorithm"]["routing_replay"] = "rollout" if replay else "none"
    fields["training"]["recompute"] = {"granularity": recompute}
    return RunConfig.model_validate(fields)


class RoutingRecorder:
    """The routing map every router call applied, `(layer index, [T, E] bool)` in call order,
    and the routes in the router's top-k order (`[T, K]`, from its probabilities)."""

    def __init__(self, trainer: PolicyTrainer):
        from megatron.core.transformer.moe.router import TopKRouter

        self.calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        for chunk in trainer.chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    module.register_forward_hook(self._record)

    def _record(self, router, inputs, outputs) -> None:
        probs, routing_map = outputs
        order = probs.detach().topk(router.topk, dim=1).indices
        self.calls.append((router.layer_number - 1, routing_map.detach().clone(), order))


def random_routes(num_tokens: int, seed: int) -> torch.Tensor:
    """`[N, L, K]` uint8: K distinct random experts per token and layer."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, ROUTING.num_layers, ROUTING.num_experts, generator=generator)
    return scores.argsort(dim=2)[..., : ROUTING.topk].to(ROUTING.dtype)


def with_routes(batch: TrainBatch, routes: torch.Tensor | None) -> TrainBatch:
    fields = {name: getattr(batch, name) for name in TrainBatch.__dataclass_fields__}
    return TrainBatch(**{**fields, "routed_experts": routes})


def routing_map(routes: torch.Tensor) -> torch.Tensor:
    """`[T, K]` expert ids -> `[T, E]` bool."""
    rows = torch.zeros(len(routes), ROUTING.num_experts, dtype=torch.bool)
    return rows.scatter(1, routes.long(), True)


def expected_calls(trainer: PolicyTrainer, batch: TrainBatch, recompute: bool) -> list:
    """`(layer, routing map)` of every router call of `trainer.train(batch)` (one mini-batch,
    no pipeline: each micro-batch's backward, recompute included, follows its forward)."""
    layers = list(range(ROUTING.num_layers))
    backward = layers[::-1] if recompute else []  # each layer re-run, last first
    micro_batches = trainer._pack(batch).micro_batches
    old_log_probs = [(mb, layer) for mb in micro_batches for layer in layers]
    training = [(mb, layer) for mb in micro_batches for layer in layers + backward]
    return [
        (layer, routing_map(mb.routed_experts[0, :, layer]))
        for mb, layer in old_log_probs + training
    ]


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_routers_replay_the_batch_routes_in_every_pass(checkpoint: Path, recompute: str) -> None:
    trainer = PolicyTrainer(run_config(checkpoint, replay=True, recompute=recompute))
    recorder = RoutingRecorder(trainer)
    plain = random_train_batch(0, LENGTHS, vocab=VOCAB)
    batch = with_routes(plain, random_routes(plain.num_tokens, seed=1))
    trainer.train(batch)
    expected = expected_calls(trainer, batch, recompute == "full")
    assert [layer for layer, *_ in recorder.calls] == [layer for layer, _ in expected]
    for (_, applied, _), (_, wanted) in zip(recorder.calls, expected, strict=True):
        assert torch.equal(applied, wanted)


def test_micro_batch_routes_follow_the_packing_and_padding_gets_experts_0_to_k() -> None:
    from megatron_dapo.mcore.micro_batches import build_micro_batch

    plain = random_train_batch(0, LENGTHS, vocab=VOCAB)
    batch = with_routes(plain, random_routes(plain.num_tokens, seed=1))
    mb = build_micro_batch(batch, (3, 1), row_length=None, pad_multiple=4)  # 5 + 9 tokens + 2
    expected = torch.cat(
        [
            batch.routed_experts[56:61],
            batch.routed_experts[17:26],
            unrouted(2, batch.routed_experts),
        ]
    )
    assert mb.routed_experts.shape == (1, 16, ROUTING.num_layers, ROUTING.topk)
    assert torch.equal(mb.routed_experts[0], expected)
    assert mb.routed_experts[0, -1].tolist() == [[0, 1], [0, 1]]
    assert build_micro_batch(plain, (3, 1), None, 4).routed_experts is None


def _own_routes(trainer: PolicyTrainer, batch: TrainBatch, recorder: RoutingRecorder):
    """`[N, L, K]` the routes `trainer` chose in the pi_old pass of `train(batch)` (top-k order),
    mapped from its packed rows back to the batch's tokens."""
    routes = torch.zeros(batch.num_tokens, ROUTING.num_layers, ROUTING.topk, dtype=ROUTING.dtype)
    micro_batches = trainer._pack(batch).micro_batches
    calls = iter(recorder.calls)
    for mb in micro_batches:
        rows = torch.cat(
            [torch.arange(batch.sample_offsets[s], batch.sample_offsets[s + 1]) for s in mb.samples]
        )
        for layer in range(ROUTING.num_layers):
            _, _, order = next(calls)
            routes[rows, layer] = order[: len(rows)].to(ROUTING.dtype)
    return routes


def _outcome(result: TrainResult, trainer: PolicyTrainer) -> list:
    step = result.optimizer_steps[0]
    return [
        result.mismatch.sums(),
        step.loss,
        step.grad_norm,
        [p.detach().clone() for p in trainer.chunks[0].parameters()],
    ]


def _assert_same(first: list, second: list) -> None:
    assert torch.equal(first[0], second[0])
    assert first[1:3] == second[1:3]
    for a, b in zip(first[3], second[3], strict=True):
        assert torch.equal(a, b)


def test_own_routes_replayed_and_replay_off_change_nothing(checkpoint: Path) -> None:
    plain = random_train_batch(2, LENGTHS, vocab=VOCAB)
    reference = PolicyTrainer(run_config(checkpoint, replay=False))
    recorder = RoutingRecorder(reference)
    expected = _outcome(reference.train(plain), reference)
    own = _own_routes(reference, plain, recorder)

    ignoring = PolicyTrainer(run_config(checkpoint, replay=False))
    _assert_same(
        _outcome(ignoring.train(with_routes(plain, random_routes(len(own), 3))), ignoring), expected
    )
    replaying = PolicyTrainer(run_config(checkpoint, replay=True))
    _assert_same(_outcome(replaying.train(with_routes(plain, own)), replaying), expected)


async def _generate(url: str, prompts: list[list[int]]) -> list[Generation]:
    """Two responses of up to 12 tokens to each prompt, with routes (seeded sampling)."""
    async with aiohttp.ClientSession() as session:
        server = SGLangServerClient(url, session, timeout_s=120.0, routing=ROUTING)
        params = SamplingParams(max_new_tokens=12, ignore_eos=True)
        return list(
            await asyncio.gather(*(server.generate(p, params) for p in prompts for _ in range(2)))
        )


def fleet_batch(prompts: list[list[int]], generations: list[Generation]) -> TrainBatch:
    """The responses as a batch: loss on every response token, random advantages."""
    samples = [p for p in prompts for _ in range(2)]
    tokens, log_probs, loss_mask, routes = [], [], [], []
    for prompt, generation in zip(samples, generations, strict=True):
        tokens += [*prompt, *generation.output_ids]
        log_probs += [0.0] * len(prompt) + list(generation.output_logprobs)
        loss_mask += [False] * len(prompt) + [True] * len(generation.output_ids)
        routes += [generation.routed_experts, unrouted(1, generation.routed_experts)]
    lengths = torch.tensor(
        [len(p) + len(g.output_ids) for p, g in zip(samples, generations, strict=True)]
    )
    return TrainBatch(
        tokens=torch.tensor(tokens),
        sample_offsets=torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
        prompt_lengths=torch.tensor([len(p) for p in samples]),
        rollout_log_probs=torch.tensor(log_probs),
        loss_mask=torch.tensor(loss_mask),
        advantages=torch.randn(len(samples), generator=torch.Generator().manual_seed(0)),
        rewards=torch.zeros(len(samples)),
        group_ids=torch.arange(len(samples)) // 2,
        weight_versions=torch.zeros(len(samples), dtype=torch.int64),
        routed_experts=torch.cat(routes),
    )


def _disagreements(recorder: RoutingRecorder, trainer: PolicyTrainer, batch: TrainBatch) -> int:
    """(token, layer) pairs of the pi_old pass whose routing differs from the fleet's, over the
    tokens the fleet routed (not a sample's last)."""
    last = batch.sample_offsets[1:] - 1
    count = 0
    calls = iter(recorder.calls)
    for mb in trainer._pack(batch).micro_batches:
        rows = torch.cat(
            [torch.arange(batch.sample_offsets[s], batch.sample_offsets[s + 1]) for s in mb.samples]
        )
        routed = ~torch.isin(rows, last)
        for layer in range(ROUTING.num_layers):
            _, applied, _ = next(calls)
            fleet = routing_map(batch.routed_experts[rows, layer])
            count += int((applied[: len(rows)] != fleet).any(dim=1)[routed].sum())
    return count


@pytest.mark.server
def test_fleet_routes_are_replayed_and_the_mismatch_falls(checkpoint: Path, tmp_path) -> None:
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (6,), generator=generator).tolist() for _ in range(8)]
    rollout = RolloutConfig(server_args=("--skip-tokenizer-init", "--dtype", "bfloat16"))
    options = EmbeddedFleetOptions(str(checkpoint), tmp_path / "logs", start_timeout_s=240.0)
    with RolloutFleet(rollout, options, ROUTING) as fleet:
        generations = asyncio.run(_generate(fleet.worker_urls[0], prompts))
    batch = fleet_batch(prompts, generations)
    assert all(
        g.routed_experts.shape == (len(p) + len(g.output_ids) - 1, 2, 2)
        for p, g in zip([p for p in prompts for _ in range(2)], generations, strict=True)
    )
    kl, disagreements = {}, {}
    for replay in (False, True):
        trainer = PolicyTrainer(run_config(checkpoint, replay=replay))
        recorder = RoutingRecorder(trainer)
        kl[replay] = trainer.train(batch).mismatch.mean_kl()
        disagreements[replay] = _disagreements(recorder, trainer, batch)
    print(f"mismatch KL {kl}, routing disagreements {disagreements} (token x layer)")
    assert disagreements[False] > 0, "the near-tie routers should make the bf16 fleet disagree"
    assert disagreements[True] == 0
    assert kl[True] < kl[False]
