"""MoE routing replay: this rank's routers take the fleet's experts (`algorithm.routing_replay`).

With `TransformerConfig.moe_enable_routing_replay` every `TopKRouter` owns a Megatron-Core
`RouterReplay`, whose top-k selection computes as usual (no action), takes its target indices
(`REPLAY_FORWARD`) or pops the oldest of its queue (`REPLAY_BACKWARD`, for a layer that
activation recompute re-runs during the backward pass); `set_target_indices` sets the target
and appends it to that queue. Replayed probabilities are the router's own scores gathered at
the given experts, so the gate keeps its gradient. `RoutingReplay` drives them per micro-batch:

* `before_forward`, before a model chunk runs a micro-batch: each router of the chunk gets the
  micro-batch's routes of its layer for the tokens this rank's router sees, `[T, K]` int64, or
  with sequence parallelism (which splits the row over TP ranks in contiguous slices) this
  rank's `[T / TP, K]`; action REPLAY_FORWARD. Expert parallelism needs nothing: routers run
  before the token dispatch, on global expert ids.
* `after_forward`: a gradient hook on the chunk's output switches the chunk's routers to
  REPLAY_BACKWARD when the backward pass of that micro-batch starts. Megatron-Core's schedules
  run a chunk's backward passes in the order of its forward passes (1F1B, interleaved), so a
  recomputed layer pops the right routes.
* `clear` after a schedule run empties the queues (layers that are not recomputed never pop).

Megatron-Core's class-level registry of every `RouterReplay` ever built in the process
(`RouterReplay.set_replay_data`) is not used: each router's own instance is addressed through
its layer number.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from megatron.core.transformer.moe.router_replay import RouterReplay


class RoutingReplay:
    """Feeds routes to the routers of this rank's model chunks.

    Args:
        chunks: this rank's model chunks as the schedule passes them to the forward step
            (wrapped or not), built with `routing_replay=True`.
        sequence_parallel: routers see this TP rank's slice of the row.
    """

    def __init__(self, chunks: list[torch.nn.Module], sequence_parallel: bool):
        from megatron.core import parallel_state
        from megatron.core.transformer.moe.router import TopKRouter

        self._routers: dict[int, list[tuple[int, RouterReplay]]] = {}
        for chunk in chunks:
            routers = [m for m in chunk.modules() if isinstance(m, TopKRouter)]
            if any(router.router_replay is None for router in routers):
                raise ValueError("routing replay needs routers built with routing_replay=True")
            self._routers[id(chunk)] = [(r.layer_number - 1, r.router_replay) for r in routers]
        self._slices = parallel_state.get_tensor_model_parallel_world_size()
        self._slice = parallel_state.get_tensor_model_parallel_rank()
        if not sequence_parallel:
            self._slices, self._slice = 1, 0

    def before_forward(self, chunk: torch.nn.Module, routes: torch.Tensor) -> None:
        """Make `chunk`'s routers replay `routes`, `[1, T, L, K]` of the micro-batch it runs
        next (L = every layer of the model, indexed by the routers' layer numbers)."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        length = routes.shape[1] // self._slices
        local = routes[0, self._slice * length : (self._slice + 1) * length]
        for layer, replay in self._routers[id(chunk)]:
            replay.set_target_indices(local[:, layer].long())
            replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)

    def after_forward(self, chunk: torch.nn.Module, output: torch.Tensor) -> None:
        """Switch `chunk`'s routers to the recompute queue once the backward pass reaches
        `output` (the chunk's output of the micro-batch just run); nothing without autograd."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        if not output.requires_grad:
            return
        replays = [replay for _, replay in self._routers[id(chunk)]]

        def replay_backward(grad: torch.Tensor) -> None:
            for replay in replays:
                replay.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)

        output.register_hook(replay_backward)

    def clear(self) -> None:
        """Forget every route and action (after a schedule run)."""
        for routers in self._routers.values():
            for _, replay in routers:
                replay.clear_indices()
                replay.clear_router_replay_action()
