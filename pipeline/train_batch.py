"""`TrainBatch`: the one contract between the data plane and the training plane.

A batch holds S samples (prompt + response each), packed back to back without padding:

    tokens            [N]    int64   prompt and response token ids of every sample, concatenated
    sample_offsets    [S+1]  int64   sample i occupies tokens[sample_offsets[i]:sample_offsets[i+1]]
    prompt_lengths    [S]    int64   the first prompt_lengths[i] tokens of sample i are its prompt
    rollout_log_probs [N]    float32 sampling log-probability (nats) of each response token under
                                     the fleet's policy that generated it; 0 at prompt positions
    loss_mask         [N]    bool    True at response tokens that contribute to the loss (False at
                                     prompt tokens and in overlong-filtered responses)
    advantages        [S]    float32 one advantage per sample (the same for all its tokens)
    rewards           [S]    float32 the shaped reward the advantage was computed from
    group_ids         [S]    int64   samples of one prompt share a group id
    weight_versions   [S]    int64   policy version that generated each sample
    metadata          S dicts        JSON-serialisable per-sample extras (finish reason, ...)
    routed_experts    [N, L, K] uint8/int16, optional (MoE routing replay): the K experts the
                                     fleet's router chose for token p at MoE layer l, ids in
                                     [0, E); `ExpertRouting` gives L, K, E and the dtype. The
                                     fleet reports none for a sample's last token (it is sampled,
                                     never fed to the model): there it holds experts 0..K-1.

Token i of a response at packed position p is predicted from position p - 1, so the training
plane reads `rollout_log_probs[p]` / `loss_mask[p]` against the logits at p - 1; routes are the
input token's, `routed_experts[p]` routes the token at p itself.
`save` / `load` write one torch file (tensors + metadata + schema version) to replay a step.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

SCHEMA_VERSION = 3

_DTYPES = {
    "tokens": torch.int64,
    "sample_offsets": torch.int64,
    "prompt_lengths": torch.int64,
    "rollout_log_probs": torch.float32,
    "loss_mask": torch.bool,
    "advantages": torch.float32,
    "rewards": torch.float32,
    "group_ids": torch.int64,
    "weight_versions": torch.int64,
}
ROUTE_DTYPES = (torch.uint8, torch.int16)
"""Dtypes of `routed_experts`: uint8 for up to 256 experts, int16 up to 32768."""


@dataclass(frozen=True)
class ExpertRouting:
    """The MoE routing the fleet reports per token: every layer is an MoE layer with `topk` of
    `num_experts` experts (routing replay, `algorithm.routing_replay: rollout`)."""

    num_layers: int
    topk: int
    num_experts: int

    @property
    def dtype(self) -> torch.dtype:
        """The most compact of `ROUTE_DTYPES` that holds every expert id."""
        for dtype in ROUTE_DTYPES:
            if self.num_experts - 1 <= torch.iinfo(dtype).max:
                return dtype
        raise ValueError(f"{self.num_experts} experts do not fit in {ROUTE_DTYPES}")

    @property
    def bytes_per_token(self) -> int:
        """Memory of one token's routes: layers x top-k x the dtype's bytes."""
        return self.num_layers * self.topk * self.dtype.itemsize

    def check(self, routes: torch.Tensor | None) -> None:
        """Raise ValueError unless `routes` (`TrainBatch.routed_experts`) are of this routing:
        `[N, num_layers, topk]` with ids below `num_experts`."""
        if routes is None:
            raise ValueError(
                "routing replay is on but the batch carries no routed experts (the fleet did "
                "not return them)"
            )
        if routes.shape[1:] != (self.num_layers, self.topk):
            raise ValueError(
                f"routed experts of {list(routes.shape[1:])} (layers, top-k) do not fit the "
                f"model's {self.num_layers} MoE layers with top-{self.topk}"
            )
        if len(routes) and int(routes.max()) >= self.num_experts:
            raise ValueError(
                f"routed expert id {int(routes.max())} exceeds the model's {self.num_experts} "
                "experts"
            )


def unrouted(num_tokens: int, like: torch.Tensor) -> torch.Tensor:
    """`[num_tokens, L, K]` routes to experts 0..K-1, in the dtype of `like` (`[*, L, K]`): the
    route of tokens no router chose for (a sample's last token, padding)."""
    num_layers, topk = like.shape[-2:]
    experts = torch.arange(topk, dtype=like.dtype, device=like.device)
    return experts.expand(num_tokens, num_layers, topk).clone()


@dataclass(frozen=True)
class TrainBatch:
    """Packed samples for one rollout step; see the module docstring for shapes and units."""

    tokens: torch.Tensor
    sample_offsets: torch.Tensor
    prompt_lengths: torch.Tensor
    rollout_log_probs: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor
    rewards: torch.Tensor
    group_ids: torch.Tensor
    weight_versions: torch.Tensor
    metadata: tuple[dict[str, Any], ...] = field(default=())
    routed_experts: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name, dtype in _DTYPES.items():
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.dim() != 1:
                got = f"{value.dtype} {tuple(value.shape)}" if torch.is_tensor(value) else value
                raise ValueError(f"TrainBatch.{name} must be a 1-D {dtype} tensor, got {got}")
        num_samples, num_tokens = len(self.prompt_lengths), len(self.tokens)
        offsets = self.sample_offsets
        if len(offsets) != num_samples + 1 or offsets[0] != 0 or offsets[-1] != num_tokens:
            raise ValueError(
                f"TrainBatch.sample_offsets must run from 0 to {num_tokens} with "
                f"{num_samples + 1} entries, got {offsets.tolist()}"
            )
        lengths = offsets.diff()
        if bool((lengths <= self.prompt_lengths).any()) or bool((self.prompt_lengths < 1).any()):
            raise ValueError(
                "every TrainBatch sample needs a prompt and at least one response token"
            )
        for name in ("rollout_log_probs", "loss_mask"):
            if len(getattr(self, name)) != num_tokens:
                raise ValueError(
                    f"TrainBatch.{name} must have {num_tokens} entries (one per token)"
                )
        for name in ("advantages", "rewards", "group_ids", "weight_versions"):
            if len(getattr(self, name)) != num_samples:
                raise ValueError(
                    f"TrainBatch.{name} must have {num_samples} entries (one per sample)"
                )
        if self.metadata and len(self.metadata) != num_samples:
            raise ValueError(f"TrainBatch.metadata must be empty or have {num_samples} entries")
        if bool((self.loss_mask & self.prompt_token_mask()).any()):
            raise ValueError("TrainBatch.loss_mask must be False at prompt tokens")
        for name, values, where in (
            ("rollout_log_probs", self.rollout_log_probs[self.loss_mask], "at loss tokens"),
            ("advantages", self.advantages, ""),
        ):
            non_finite = int((~torch.isfinite(values)).sum())
            if non_finite:
                raise ValueError(f"TrainBatch.{name} has {non_finite} non-finite value(s) {where}")
        if self.routed_experts is not None:
            self._check_routes(self.routed_experts)

    def _check_routes(self, routes: torch.Tensor) -> None:
        """`routed_experts` is `[N, L, K]` of a route dtype, with K distinct experts >= 0."""
        if (
            not isinstance(routes, torch.Tensor)
            or routes.dtype not in ROUTE_DTYPES
            or routes.dim() != 3
            or len(routes) != self.num_tokens
        ):
            got = f"{routes.dtype} {tuple(routes.shape)}" if torch.is_tensor(routes) else routes
            raise ValueError(
                f"TrainBatch.routed_experts must be a [{self.num_tokens}, layers, top-k] tensor "
                f"of {ROUTE_DTYPES}, got {got}"
            )
        if bool((routes < 0).any()):
            raise ValueError("TrainBatch.routed_experts holds negative expert ids")
        repeated = (routes.sort(dim=2).values.diff(dim=2) == 0).any(dim=2)  # [N, L]
        if bool(repeated.any()):
            token, layer = (int(i) for i in repeated.nonzero()[0])
            raise ValueError(
                f"TrainBatch.routed_experts routes token {token} to one expert twice at layer "
                f"{layer}: {routes[token, layer].tolist()}"
            )

    @property
    def num_samples(self) -> int:
        return len(self.prompt_lengths)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def sample_ids(self) -> torch.Tensor:
        """[N] int64: the sample index of every packed token."""
        return torch.repeat_interleave(torch.arange(self.num_samples), self.sample_offsets.diff())

    def prompt_token_mask(self) -> torch.Tensor:
        """[N] bool: True at prompt tokens."""
        position = torch.arange(self.num_tokens) - self.sample_offsets[self.sample_ids()]
        return position < self.prompt_lengths[self.sample_ids()]

    def response_lengths(self) -> torch.Tensor:
        """[S] int64: generated tokens per sample."""
        return self.sample_offsets.diff() - self.prompt_lengths

    def select(self, samples: torch.Tensor) -> TrainBatch:
        """A new batch of the given sample indices ([K] int64), in that order."""
        starts = self.sample_offsets[samples]
        lengths = self.sample_offsets[samples + 1] - starts
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        shift = torch.repeat_interleave(offsets[:-1] - starts, lengths)
        token_index = torch.arange(int(offsets[-1])) - shift
        return TrainBatch(
            tokens=self.tokens[token_index],
            sample_offsets=offsets,
            prompt_lengths=self.prompt_lengths[samples],
            rollout_log_probs=self.rollout_log_probs[token_index],
            loss_mask=self.loss_mask[token_index],
            advantages=self.advantages[samples],
            rewards=self.rewards[samples],
            group_ids=self.group_ids[samples],
            weight_versions=self.weight_versions[samples],
            metadata=tuple(self.metadata[i] for i in samples.tolist()) if self.metadata else (),
            routed_experts=(
                self.routed_experts[token_index] if self.routed_experts is not None else None
            ),
        )

    def save(self, path: str | Path) -> None:
        """Write the batch to one file (torch format, tensors and metadata, schema version)."""
        payload = {f.name: getattr(self, f.name) for f in fields(self)}
        payload["metadata"] = list(self.metadata)
        torch.save({"schema_version": SCHEMA_VERSION, "batch": payload}, path)

    @classmethod
    def load(cls, path: str | Path) -> TrainBatch:
        """Read a batch written by `save`; refuses other schema versions."""
        stored = torch.load(path, weights_only=True)
        version = stored.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"{path}: TrainBatch schema version {version}, expected {SCHEMA_VERSION}"
            )
        payload = dict(stored["batch"])
        payload["metadata"] = tuple(payload["metadata"])
        return cls(**payload)
